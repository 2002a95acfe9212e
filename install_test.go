package jobwatch_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTableAppearsLater: the table does not exist when the watch starts
// and the poll interval is an hour. The watch says so once, installs the
// triggers on its own backoff (default settings) soon after the table
// appears, polls then, and notifications work from there on.
func TestTableAppearsLater(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	ch := make(chan jobwatch.Message, 10)
	l := testListener(t, d.url, opt)
	w, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	defer w.Close()
	eventually(t, "first poll", func() bool { return w.Stats().Polls >= 1 })
	require.Error(t, w.Stats().LastError)
	require.Contains(t, lg.String(), "job table does not exist yet")

	// A job inserted before the triggers exist is found by the poll that
	// follows their installation, not an hour later.
	d.jobTable(t, "jobs")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "job inserted as the table appeared")
	eventually(t, "triggers installed", func() bool {
		ok, _ := jobwatch.NotificationTriggersHealthy(ctxT(t), d.pool, "jobs")
		return ok
	})
	assert.EqualValues(t, 1, w.Stats().TriggerRepairs)
	// The first job stays in the table, so any poll still under way (the
	// installer's, the failed poll's retry) wakes the channel again: the
	// notification is told apart by its count, not by the next wake-up.
	d.exec(t, "DELETE FROM jobs")
	drain(ch)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "after the insert")
	eventually(t, "the notification counted", func() bool { return w.Stats().Notifications >= 1 })
	assert.EqualValues(t, 1, w.Stats().Notifications)
	assert.Equal(t, 1, lg.count("job table does not exist yet"), "said once")
	assert.Equal(t, 1, lg.count("poll failed"), "said once")
	assert.Equal(t, 1, lg.count("polling works again"))
	assert.NotContains(t, lg.String(), "level=ERROR msg=\"jobwatch: cannot install")
}

// role creates a login role for one test (roles are shared by the whole
// server, so its name is unique) and drops it when the test ends.
func role(t *testing.T, d db) string {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "jobwatch_worker_" + hex.EncodeToString(b[:])
	d.exec(t, "CREATE ROLE "+name+" LOGIN")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, d.url)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close(ctx)
		// The test's database goes after this; its grants go with the role.
		_, err = conn.Exec(ctx, "DROP OWNED BY "+name+"; DROP ROLE "+name)
		if err != nil {
			t.Error(err)
		}
	})
	return name
}

// TestLeastPrivilegeWorker: the triggers come from a migration run by the
// table's owner and the worker's role has no DDL rights. With healthy
// triggers the worker attempts no DDL and reports nothing, across a
// reconnect too. When the triggers go missing it says once, clearly, what
// to do; polling finds the jobs meanwhile; once the owner runs the script
// again notifications come back.
func TestLeastPrivilegeWorker(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.jobTable(t, "jobs")
	worker := role(t, d)
	d.exec(t, "GRANT SELECT, INSERT, UPDATE ON jobs TO "+worker)
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs")) // the migration, as the owner

	url := d.with(t, "user", worker)
	pool, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	defer pool.Close()
	var who string
	require.NoError(t, pool.QueryRow(ctxT(t), "SELECT current_user").Scan(&who))
	require.Equal(t, worker, who)
	// Current triggers need no right; the role really has none.
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), pool, "jobs", opt))
	_, err = pool.Exec(ctxT(t), "CREATE FUNCTION jobwatch_probe() RETURNS int LANGUAGE sql AS 'SELECT 1'")
	require.Error(t, err, "the worker role can create functions: the test proves nothing")

	listenerURL, err := pgtest.WithParam(url, "application_name", "jobwatch_lp_listener")
	require.NoError(t, err)
	l := testListener(t, listenerURL, opt)
	w, ch, _ := d.watch(t, opt, watchSetup{interval: 100 * time.Millisecond, listener: l, pool: pool, noTable: true, opts: []jobwatch.Option{jobwatch.WithJitter(0), jobwatch.WithInstallBackoff(50*time.Millisecond, 200*time.Millisecond)}})
	_, err = pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	waitWake(t, ch, "worker role, healthy triggers")

	reconnects := l.Stats().Reconnects
	d.exec(t, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jobwatch_lp_listener' AND datname = current_database()")
	eventually(t, "reconnected", func() bool { return l.Stats().Reconnects > reconnects && l.Stats().Connected })
	polls := w.Stats().Polls
	eventually(t, "polls after the reconnect", func() bool { return w.Stats().Polls > polls+2 })
	assert.NoError(t, w.Stats().LastError, "healthy triggers: no error")
	assert.NotContains(t, lg.String(), "level=ERROR")
	assert.NotContains(t, lg.String(), "installed notification triggers")

	// The triggers go missing: one clear line, polling goes on.
	d.exec(t, "DROP TRIGGER did_insert_job_jobs ON jobs")
	eventually(t, "the worker notices", func() bool { return lg.count("this role may not") > 0 })
	assert.ErrorIs(t, w.Stats().LastError, jobwatch.ErrPermissionDenied)
	drain(ch)
	_, err = pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	waitWake(t, ch, "found by polling")
	polls = w.Stats().Polls
	eventually(t, "many polls and install attempts later", func() bool { return w.Stats().Polls > polls+5 })
	assert.Equal(t, 1, lg.count("this role may not"), "said once")
	assert.Contains(t, lg.String(), "CreateNotificationTriggerSQL")

	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	eventually(t, "the worker sees the triggers back", func() bool { return lg.count("notification triggers in place") > 0 })
	notified := w.Stats().Notifications
	_, err = pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	eventually(t, "notified again", func() bool { return w.Stats().Notifications > notified })
}

// TestWorkerWithoutRightsTakesNoLock: a worker role that may not install
// the triggers stops before it takes a lock, so a writer holding the
// table, or another installer, never turns its one clear ERROR into
// "busy" lines and repeats of the ERROR. It used to lock the table
// (NOWAIT) and only then fail on CREATE TRIGGER: with a transaction open
// on the table it said "a lock is held" at every attempt, and never why
// it could not install.
func TestWorkerWithoutRightsTakesNoLock(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.jobTable(t, "jobs")
	worker := role(t, d)
	d.exec(t, "GRANT SELECT, INSERT, UPDATE ON jobs TO "+worker)
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	d.exec(t, "DROP TRIGGER did_insert_job_jobs ON jobs")
	pool := poolAs(t, d, worker)

	// A producer's transaction stays open on the table.
	writer, err := d.pool.Begin(ctxT(t))
	require.NoError(t, err)
	defer func() { _ = writer.Rollback(context.Background()) }()
	_, err = writer.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)

	err = jobwatch.EnsureNotificationTriggers(ctxT(t), pool, "jobs", opt)
	require.ErrorIs(t, err, jobwatch.ErrPermissionDenied)
	assert.Contains(t, err.Error(), "may not install the notification triggers")

	w, _, _ := d.watch(t, opt, watchSetup{interval: 50 * time.Millisecond, pool: pool, noTable: true,
		opts: []jobwatch.Option{jobwatch.WithJitter(0), jobwatch.WithInstallBackoff(20*time.Millisecond, 40*time.Millisecond)}})
	eventually(t, "the worker says why", func() bool { return lg.count("this role may not") > 0 })
	polls := w.Stats().Polls
	eventually(t, "many install attempts later", func() bool { return w.Stats().Polls > polls+10 })
	assert.Equal(t, 1, lg.count("this role may not"), "said once")
	assert.Zero(t, lg.count("a lock is held"))
	assert.ErrorIs(t, w.Stats().LastError, jobwatch.ErrPermissionDenied)
}

// ihpScript is IHP's createNotificationTriggerSQL (IHP/Job/Queue/Watch.hs),
// as an IHP worker runs it at start.
func ihpScript(table string) string {
	fn := "notify_job_queued_" + table
	ins := "did_insert_job_" + table
	upd := "did_update_job_" + table
	return `DO $$
BEGIN
    SET LOCAL lock_timeout = '5s';
    IF NOT pg_try_advisory_xact_lock(hashtext(current_schema()), hashtext('` + fn + `'::name::text)) THEN
        RAISE EXCEPTION 'Notification trigger installation already in progress' USING ERRCODE = '55P03';
    END IF;
    CREATE OR REPLACE FUNCTION ` + fn + `() RETURNS TRIGGER AS $BODY$BEGIN
    PERFORM pg_notify('job_available_` + table + `', '');
    RETURN new;
END;
$BODY$ language plpgsql;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '` + ins + `'::name AND tgrelid = '` + table + `'::regclass)
       OR NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '` + upd + `'::name AND tgrelid = '` + table + `'::regclass) THEN
        LOCK TABLE "` + table + `" IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '` + ins + `'::name AND tgrelid = '` + table + `'::regclass) THEN
        CREATE TRIGGER ` + ins + ` AFTER INSERT ON "` + table + `" FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE ` + fn + `();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '` + upd + `'::name AND tgrelid = '` + table + `'::regclass) THEN
        CREATE TRIGGER ` + upd + ` AFTER UPDATE ON "` + table + `" FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE ` + fn + `();
    END IF;
END; $$`
}

// ihpHealthy is IHP's notificationTriggersHealthy query.
func ihpHealthy(t *testing.T, d db, table string) bool {
	t.Helper()
	var n int
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT COUNT(*) FROM pg_trigger t
		JOIN pg_class c ON t.tgrelid = c.oid JOIN pg_namespace n ON c.relnamespace = n.oid
		WHERE n.nspname = current_schema() AND c.relname = $1::name AND NOT t.tgisinternal
		AND (t.tgname = $2::name OR t.tgname = $3::name)`,
		table, "did_insert_job_"+table, "did_update_job_"+table).Scan(&n))
	return n == 2
}

func triggerCount(t *testing.T, d db, table string) int {
	t.Helper()
	var n int
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
		`"`+table+`"`).Scan(&n))
	return n
}

// TestIHPNamesNearTheLimit: for every table name length IHP can use (up to
// 49 bytes, where PostgreSQL cuts its trigger and function names), IHP and
// jobwatch see each other's triggers as healthy whichever installs first,
// the table keeps two triggers, and IHP's triggers wake a jobwatch watch.
func TestIHPNamesNearTheLimit(t *testing.T) {
	t.Parallel()
	for _, length := range []int{44, 45, 46, 47, 48, 49} {
		t.Run(fmt.Sprint(length), func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			ihpFirst := "i" + strings.Repeat("x", length-1)
			goFirst := "g" + strings.Repeat("y", length-1)
			for _, table := range []string{ihpFirst, goFirst} {
				d.jobTable(t, table)
			}
			ctx := ctxT(t)
			// IHP first, then jobwatch.
			d.exec(t, ihpScript(ihpFirst))
			require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, ihpFirst, opt))
			assert.True(t, triggersHealthy(t, d.pool, ihpFirst), "jobwatch sees IHP's triggers")
			assert.Equal(t, 2, triggerCount(t, d, ihpFirst))
			// jobwatch first, then IHP.
			require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, goFirst, opt))
			assert.True(t, ihpHealthy(t, d, goFirst), "IHP sees jobwatch's triggers")
			d.exec(t, ihpScript(goFirst))
			assert.Equal(t, 2, triggerCount(t, d, goFirst))

			// IHP's row triggers wake a jobwatch watch, and jobwatch's
			// statement triggers a plain LISTEN on IHP's channel.
			_, ch, _ := d.watch(t, opt, watchSetup{table: ihpFirst, noTable: true})
			d.exec(t, `INSERT INTO "`+ihpFirst+`" DEFAULT VALUES`)
			waitWake(t, ch, "IHP's trigger")
			assert.Equal(t, 2, triggerCount(t, d, ihpFirst), "the watch installed nothing more")

			conn, err := pgx.Connect(ctx, d.url)
			require.NoError(t, err)
			defer conn.Close(ctx)
			_, err = conn.Exec(ctx, "LISTEN "+pgx.Identifier{"job_available_" + goFirst}.Sanitize())
			require.NoError(t, err)
			d.exec(t, `INSERT INTO "`+goFirst+`" DEFAULT VALUES`)
			n, err := conn.WaitForNotification(ctx)
			require.NoError(t, err)
			assert.Equal(t, "job_available_"+goFirst, n.Channel)
		})
	}
}

// TestSharedPrefixNeverCrossesChannels: two 47-byte tables share their
// first 46 bytes, so PostgreSQL cuts IHP's function name of both to the
// same 63 bytes; IHP itself would then send one table's jobs to the other
// table's channel. jobwatch's triggers never share a function, and
// jobwatch does not touch the cut IHP function, so each insert wakes its
// own table's watch only, even after IHP's script rewrote that function.
func TestSharedPrefixNeverCrossesChannels(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	prefix := strings.Repeat("p", 46)
	a, b := prefix+"a", prefix+"b"
	ctx := ctxT(t)
	l := testListener(t, d.url, opt)
	watch := func(table string) (*jobwatch.Watch, chan jobwatch.Message) {
		d.jobTable(t, table)
		w, ch, _ := d.watch(t, opt, watchSetup{table: table, listener: l, noTable: true})
		return w, ch
	}
	wa, cha := watch(a)
	wb, chb := watch(b)
	var fns int
	require.NoError(t, d.pool.QueryRow(ctx, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'notify_job_queued_%'").Scan(&fns))
	assert.Equal(t, 0, fns, "jobwatch created no cut IHP function")

	d.exec(t, ihpScript(b)) // IHP starts for b: the cut function now notifies b's channel
	for round := range 2 {
		d.exec(t, `INSERT INTO "`+a+`" DEFAULT VALUES`)
		waitWake(t, cha, "a's insert")
		d.exec(t, `INSERT INTO "`+b+`" DEFAULT VALUES`)
		waitWake(t, chb, "b's insert")
		eventually(t, "each watch got its own", func() bool {
			return wa.Stats().Notifications == uint64(round+1) && wb.Stats().Notifications == uint64(round+1)
		})
		assert.Equal(t, 0, drain(cha)+drain(chb), "nobody woken twice")
	}
}

// TestUnrepairableTriggersPollFaster: the triggers go missing under a
// worker that may not install them, and its poll interval is an hour.
// Once its installer has seen it (at a Listener reconnect here), the
// watch polls at its fallback interval, so jobs still start within a
// second, and back at its interval once a migration restored them.
func TestUnrepairableTriggersPollFaster(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	worker := role(t, d)
	d.exec(t, "GRANT SELECT, INSERT, UPDATE ON jobs TO "+worker)
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	pool := poolAs(t, d, worker)
	listenerURL, err := pgtest.WithParam(d.with(t, "user", worker), "application_name", "jobwatch_unrepairable")
	require.NoError(t, err)
	w, ch, _ := d.watch(t, opt, watchSetup{listener: testListener(t, listenerURL, opt), pool: pool, noTable: true})
	require.Equal(t, time.Hour, w.Stats().PollInterval)

	d.exec(t, "DROP TRIGGER did_insert_job_jobs ON jobs")
	d.exec(t, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jobwatch_unrepairable' AND datname = current_database()")
	eventually(t, "polling at the fallback interval", func() bool { return w.Stats().PollInterval == time.Second })
	st := w.Stats()
	assert.False(t, st.NotificationsWorking, "the watch does not rely on notifications")
	assert.Contains(t, st.FallbackCause, "triggers do not notify")
	drain(ch)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "found by a fallback poll")

	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	eventually(t, "back at the interval", func() bool { return w.Stats().PollInterval == time.Hour })
	st = w.Stats()
	assert.True(t, st.NotificationsWorking)
	assert.Empty(t, st.FallbackCause)
}
