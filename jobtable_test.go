package jobwatch_test

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The job tables of other queues, as their own schemas make them (see the
// README's "Any job table"), each with the description that watches it,
// an INSERT of a job due now, one due in about a second, and one that
// does not wait.
var jobTableShapes = []struct {
	name, schema string
	desc         jobwatch.JobTable
	now, later   string
	notPending   string
}{
	{
		name: "gue",
		schema: `CREATE TABLE gue_jobs (job_id text PRIMARY KEY DEFAULT gen_random_uuid()::text, priority smallint NOT NULL DEFAULT 0,
			run_at timestamptz NOT NULL, job_type text NOT NULL DEFAULT 'x', args bytea NOT NULL DEFAULT '',
			error_count integer NOT NULL DEFAULT 0, last_error text, queue text NOT NULL DEFAULT '')`,
		desc:  jobwatch.JobTable{RunAt: "run_at", Queue: "queue"},
		now:   "INSERT INTO gue_jobs (run_at) VALUES (now())",
		later: "INSERT INTO gue_jobs (run_at) VALUES (now() + interval '1 second')",
	},
	{
		name: "Que, NULL run_at",
		schema: `CREATE TABLE que_jobs (id bigserial PRIMARY KEY, run_at timestamptz, finished_at timestamptz, expired_at timestamptz,
			queue text NOT NULL DEFAULT 'default')`,
		desc:       jobwatch.JobTable{Pending: "finished_at IS NULL AND expired_at IS NULL", RunAt: "run_at", Queue: "queue"},
		now:        "INSERT INTO que_jobs (run_at) VALUES (NULL)",
		later:      "INSERT INTO que_jobs (run_at) VALUES (now() + interval '1 second')",
		notPending: "INSERT INTO que_jobs (run_at, finished_at) VALUES (NULL, now())",
	},
	{
		name: "River, enum and no due column",
		schema: `CREATE TYPE river_job_state AS ENUM ('available', 'running', 'scheduled', 'completed');
			CREATE TABLE river_job (id bigserial PRIMARY KEY, state river_job_state NOT NULL DEFAULT 'available',
			scheduled_at timestamptz NOT NULL DEFAULT now(), queue text NOT NULL DEFAULT 'default')`,
		desc:       jobwatch.JobTable{Pending: "state = 'available'", Queue: "queue"},
		now:        "INSERT INTO river_job DEFAULT VALUES",
		notPending: "INSERT INTO river_job (state) VALUES ('scheduled')",
	},
	{
		name: "Oban, naive UTC",
		schema: `CREATE TABLE oban_jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'available',
			scheduled_at timestamp without time zone NOT NULL DEFAULT (now() AT TIME ZONE 'utc'))`,
		desc:       jobwatch.JobTable{Pending: "state = 'available'", RunAt: "scheduled_at", RunAtTimeZone: "UTC"},
		now:        "INSERT INTO oban_jobs DEFAULT VALUES",
		later:      "INSERT INTO oban_jobs (scheduled_at) VALUES ((now() AT TIME ZONE 'utc') + interval '1 second')",
		notPending: "INSERT INTO oban_jobs (state) VALUES ('executing')",
	},
	{
		name: "dataddo/pgq, NULL = now, partitioned",
		schema: `CREATE TABLE pgq_jobs (id bigserial, processed_at timestamptz, scheduled_for timestamptz, created_at date NOT NULL DEFAULT current_date)
				PARTITION BY RANGE (created_at);
			CREATE TABLE pgq_jobs_all PARTITION OF pgq_jobs FOR VALUES FROM ('2000-01-01') TO ('3000-01-01')`,
		desc:       jobwatch.JobTable{Pending: "processed_at IS NULL", RunAt: "scheduled_for"},
		now:        "INSERT INTO pgq_jobs DEFAULT VALUES",
		later:      "INSERT INTO pgq_jobs (scheduled_for) VALUES (now() + interval '1 second')",
		notPending: "INSERT INTO pgq_jobs (processed_at) VALUES (now())",
	},
}

// TestJobTableShapes: each field's job table, watched with its
// description, wakes its worker for a job due now (and not for one that
// does not wait), and at the moment a job scheduled for later is due.
func TestJobTableShapes(t *testing.T) {
	t.Parallel()
	for _, c := range jobTableShapes {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			logs, opt := newLogs(t)
			d.exec(t, c.schema)
			table := strings.Fields(c.now)[2]
			w, ch, _ := d.watch(t, opt, watchSetup{table: table, noTable: true, opts: []jobwatch.Option{jobwatch.WithJobTable(c.desc)}})
			require.True(t, triggersHealthy(t, d.pool, table))

			if c.notPending != "" {
				d.exec(t, c.notPending)
			}
			d.exec(t, c.now)
			waitWake(t, ch, "a job due now")
			st := w.Stats()
			assert.Equal(t, uint64(1), st.Notifications, "the row that does not wait notified")
			eventually(t, "the wake-up counted", func() bool { return w.Stats().Wakeups.Notification == 1 })

			if c.later != "" {
				d.exec(t, "DELETE FROM "+table) // as a worker fetches it (DELETE notifies nobody)
				var due time.Time
				require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT now() + interval '1 second'").Scan(&due))
				d.exec(t, c.later)
				waitWake(t, ch, "a job scheduled for later")
				assert.False(t, time.Now().Add(10*time.Millisecond).Before(due), "woken before the job was due")
				eventually(t, "the wake-up counted", func() bool { return w.Stats().Wakeups.Scheduled == 1 })
				assert.Equal(t, uint64(1), w.Stats().Wakeups.Notification, "%+v", w.Stats().Wakeups)
			}
			assert.Zero(t, logs.lines("level=ERROR"), logs.String())
		})
	}
}

// TestJobTablePollerAlone: a poller without a watch counts the due jobs
// of a River-like table (an enum state, no due column) and wakes one
// worker each.
func TestJobTablePollerAlone(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, jobTableShapes[2].schema)
	d.exec(t, "INSERT INTO river_job (state) VALUES ('available'), ('available'), ('running'), ('scheduled')")
	ch := make(chan jobwatch.Message, 10)
	p, err := jobwatch.PollForJob(ctxT(t), false, d.pool, "river_job", time.Hour, ch, opt,
		jobwatch.WithJobTable(jobwatch.JobTable{Pending: "state = 'available'"}))
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	eventually(t, "first poll", func() bool { return p.Stats().Polls >= 1 })
	assert.Equal(t, 2, drain(ch))
	assert.Equal(t, uint64(0), p.Stats().PollErrors)
}

// TestJobTableDefaultIsIHPs: IHP's description gives IHP's script, to the
// byte.
func TestJobTableDefaultIsIHPs(t *testing.T) {
	for _, table := range []string{"jobs", "app.jobs", `"Odd%Name"`} {
		assert.Equal(t, jobwatch.CreateNotificationTriggerSQL(table), jobwatch.CreateNotificationTriggerSQLFor(table, jobwatch.IHPJobTable))
	}
	assert.NotEqual(t, jobwatch.CreateNotificationTriggerSQL("jobs"), jobwatch.CreateNotificationTriggerSQLFor("jobs", jobwatch.JobTable{RunAt: "run_at"}))
	// The scripts, with the gate and without, as this release makes them
	// (the release before JobTable's, plus the transaction's id in every
	// payload, for WithFleet): a change here makes every installed
	// trigger function out of date, so it must be meant.
	hash := func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }
	assert.Equal(t, "4e9031c718780540403394c8bf4d1526eca13a74332f88690ecdaea90ebe0bf9", hash(jobwatch.CreateNotificationTriggerSQL("jobs")))
	assert.Equal(t, "e24934b4e64872f911183b8d1dcbea204102c5e5a773abdc5cd592ab05b0e0f0",
		hash(jobwatch.CreateNotificationTriggerSQLWith("jobs", jobwatch.WithNotifyGate(false))))
}

// TestJobTableRefused: descriptions that cannot be watched are refused at
// the call, with ErrInvalidJobTable and the reason, by the watch, the
// poller, EnsureNotificationTriggers and the SQL script, and nothing is
// installed.
func TestJobTableRefused(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.exec(t, `CREATE TYPE st AS ENUM ('available', 'running');
		CREATE TABLE q (id bigserial, state st, status text, n int, run_at timestamptz, naive timestamp, queue text, nq int)`)
	for _, c := range []struct {
		name   string
		desc   jobwatch.JobTable
		reason string
	}{
		{"changes with time", jobwatch.JobTable{Pending: "run_at < now()"}, "IMMUTABLE"},
		{"stable cast of an enum", jobwatch.JobTable{Pending: "state::text = 'available'"}, "IMMUTABLE"},
		{"subquery", jobwatch.JobTable{Pending: "id IN (SELECT 1)"}, "subquery"},
		{"aggregate", jobwatch.JobTable{Pending: "count(*) > 0"}, "aggregate"},
		{"not a condition", jobwatch.JobTable{Pending: "n"}, "boolean"},
		{"unknown column", jobwatch.JobTable{Pending: "nope IS NULL"}, "nope"},
		{"volatile function", jobwatch.JobTable{Pending: "random() > 0.5"}, "IMMUTABLE"},
		{"another table", jobwatch.JobTable{Pending: "pg_class.oid = 1"}, "pg_class"},
		{"a second statement", jobwatch.JobTable{Pending: "true; DROP TABLE q"}, "semicolon"},
		{"leaving the parentheses", jobwatch.JobTable{Pending: "true) OR (true"}, "parentheses"},
		{"a comment", jobwatch.JobTable{Pending: "true -- ) ; DROP TABLE q"}, "comment"},
		{"a block comment", jobwatch.JobTable{Pending: "true /* x */"}, "comment"},
		{"a dollar quote", jobwatch.JobTable{Pending: "status = $$x$$"}, "dollar"},
		{"ending the script's quote", jobwatch.JobTable{Pending: "status = '$jobwatch$'); DROP TABLE q; --'"}, "Pending"},
		{"an unterminated quote", jobwatch.JobTable{Pending: "status = 'x"}, "unterminated"},
		{"a backslash", jobwatch.JobTable{Pending: `status = E'\''`}, "backslash"},
		{"RunAt missing", jobwatch.JobTable{RunAt: "due_at"}, "no column"},
		{"RunAt not a time", jobwatch.JobTable{RunAt: "n"}, "must be a timestamp"},
		{"zone on a timestamptz", jobwatch.JobTable{RunAt: "run_at", RunAtTimeZone: "UTC"}, "without time zone"},
		{"unknown zone", jobwatch.JobTable{RunAt: "naive", RunAtTimeZone: "Mars/Olympus"}, "Mars/Olympus"},
		{"zone without RunAt", jobwatch.JobTable{RunAtTimeZone: "UTC"}, "without a RunAt"},
		{"Queue missing", jobwatch.JobTable{Queue: "nope"}, "no column"},
		{"Queue not text", jobwatch.JobTable{Queue: "nq"}, "string type"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := ctxT(t)
			ch := make(chan jobwatch.Message, 1)
			l := testListener(t, d.url)
			opt := jobwatch.WithJobTable(c.desc)
			_, err := jobwatch.WatchForJob(ctx, d.pool, l, "q", time.Hour, ch, opt)
			require.ErrorIs(t, err, jobwatch.ErrInvalidJobTable)
			assert.Contains(t, err.Error(), c.reason)
			_, err = jobwatch.PollForJob(ctx, false, d.pool, "q", time.Hour, ch, opt)
			require.ErrorIs(t, err, jobwatch.ErrInvalidJobTable)
			err = jobwatch.EnsureNotificationTriggers(ctx, d.pool, "q", opt)
			require.ErrorIs(t, err, jobwatch.ErrInvalidJobTable)
			assert.Contains(t, err.Error(), c.reason)
			_, err = d.pool.Exec(ctx, jobwatch.CreateNotificationTriggerSQLFor("q", c.desc))
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.reason)
			var installed int
			require.NoError(t, d.pool.QueryRow(ctx, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'jobwatch%'").Scan(&installed))
			assert.Zero(t, installed)
			var exists bool
			require.NoError(t, d.pool.QueryRow(ctx, "SELECT to_regclass('q') IS NOT NULL").Scan(&exists))
			assert.True(t, exists)
		})
	}
	// A queue filter needs a Queue column.
	_, err := jobwatch.PollForJob(ctxT(t), false, d.pool, "q", time.Hour, make(chan jobwatch.Message, 1),
		jobwatch.WithJobTable(jobwatch.JobTable{RunAt: "run_at"}), jobwatch.WithQueues("a"))
	require.ErrorIs(t, err, jobwatch.ErrInvalidOption)
}

// TestJobTablePlantedOperator: an operator another role plants in public,
// an exact match for a varchar column that beats pg_catalog's text = text,
// never runs: not in the producers' INSERTs, whose search_path has public
// first, nor in the polls of a pool whose search_path has it first.
func TestJobTablePlantedOperator(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, "GRANT CREATE ON SCHEMA public TO PUBLIC")
	d.exec(t, `CREATE TABLE vjobs (id bigserial, status varchar(20) NOT NULL DEFAULT 'ready', queue varchar(20) NOT NULL DEFAULT 'a', run_at timestamptz)`)
	other := connectAs(t, d, role(t, d))
	_, err := other.Exec(ctxT(t), `
		CREATE TABLE public.stolen (who text);
		GRANT INSERT ON public.stolen TO PUBLIC;
		CREATE FUNCTION public.steal(varchar, varchar) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS
			$$ BEGIN INSERT INTO public.stolen VALUES (current_user); RETURN $1::text = $2::text; END $$;
		CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.steal);`)
	require.NoError(t, err)
	pool := poolAs(t, d, "", "search_path=public")
	desc := jobwatch.JobTable{Pending: "status = 'ready'", RunAt: "run_at", Queue: "queue"}
	w, ch, _ := d.watch(t, opt, watchSetup{table: "vjobs", noTable: true, pool: pool,
		opts: []jobwatch.Option{jobwatch.WithJobTable(desc), jobwatch.WithQueues("a")}})
	d.exec(t, "SET search_path = public; INSERT INTO vjobs DEFAULT VALUES; INSERT INTO vjobs (run_at) VALUES (now() + interval '200 milliseconds')")
	waitWake(t, ch, "the job due now")
	waitWake(t, ch, "the job due later, found by a poll")
	eventually(t, "the second poll counted", func() bool { return w.Stats().Polls >= 2 })
	var stolen int
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT count(*) FROM public.stolen").Scan(&stolen))
	assert.Zero(t, stolen, "another role's operator ran")
	// The pool's own search_path is as it was.
	var path string
	require.NoError(t, pool.QueryRow(ctxT(t), "SHOW search_path").Scan(&path))
	assert.Equal(t, "public", path)
}

// TestJobTableNaiveUTC: a job due at a UTC wall-clock time in a timestamp
// without time zone is woken on time, whatever the TimeZone of the
// producer's and the watch's sessions (13 and -8 hours from UTC).
func TestJobTableNaiveUTC(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, jobTableShapes[3].schema)
	pool := poolAs(t, d, "", "TimeZone=Pacific/Auckland")
	w, ch, _ := d.watch(t, opt, watchSetup{table: "oban_jobs", noTable: true, pool: pool,
		opts: []jobwatch.Option{jobwatch.WithJobTable(jobTableShapes[3].desc)}})
	producer := poolAs(t, d, "", "TimeZone=America/Los_Angeles")
	var due time.Time
	require.NoError(t, producer.QueryRow(ctxT(t), `INSERT INTO oban_jobs (scheduled_at)
		VALUES ((now() AT TIME ZONE 'UTC') + interval '700 milliseconds') RETURNING scheduled_at AT TIME ZONE 'UTC'`).Scan(&due))
	waitWake(t, ch, "the job at its UTC time")
	assert.False(t, time.Now().Add(10*time.Millisecond).Before(due), "woken before the job was due")
	eventually(t, "the wake-up counted", func() bool { return w.Stats().Wakeups.Scheduled == 1 })
}

// TestJobTableQueues: a watch with WithQueues wakes only for its queues'
// jobs, and its polls count only those; a queue name too long for a
// notification makes every watch look.
func TestJobTableQueues(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, jobTableShapes[0].schema)
	desc := jobwatch.WithJobTable(jobTableShapes[0].desc)
	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) SELECT now(), q FROM unnest(ARRAY['a', 'a', 'b', 'b', 'b', '']) q")
	w, ch, l := d.watch(t, opt, watchSetup{table: "gue_jobs", noTable: true, opts: []jobwatch.Option{desc, jobwatch.WithQueues("a", "")}})
	// The first poll counted a, a and "": the channel held 3.
	eventually(t, "3 wake-ups", func() bool { return w.Stats().Wakeups.Poll == 3 })
	other := make(chan jobwatch.Message, 10)
	wb, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "gue_jobs", time.Hour, other, desc, jobwatch.WithQueues("b"), opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = wb.Close() })
	settle(t, wb, other)
	eventually(t, "3 wake-ups", func() bool { return wb.Stats().Wakeups.Poll == 3 })

	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), 'b')")
	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), 'a')")
	waitWake(t, ch, "queue a's job")
	waitWake(t, other, "queue b's job")
	assert.Equal(t, uint64(2), w.Stats().Notifications)
	eventually(t, "a's wake-up counted", func() bool { return w.Stats().Wakeups.Notification == 1 })
	eventually(t, "b's wake-up counted", func() bool { return wb.Stats().Wakeups.Notification == 1 })
	assert.Equal(t, 0, drain(ch)+drain(other), "woken for another queue's job")

	// A queue name over the payload's limit: "poll", which a watch of any
	// queue follows, and whose poll counts only its own queues.
	d.exec(t, "DELETE FROM gue_jobs") // DELETE notifies nobody
	polls := wb.Stats().Polls
	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), repeat('x', 300))")
	eventually(t, "the poll", func() bool { return wb.Stats().Polls > polls })
	assert.Zero(t, drain(other), "woken for another queue's job")
}

// TestJobTableConflict: two watches that describe one table differently
// do not replace each other's triggers in turn: the second replaces the
// first's once, with one warning; the first then polls every fallback
// interval and says why in one error line. The doctor fails the
// description that is not installed.
func TestJobTableConflict(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	logs, opt := newLogs(t)
	d.exec(t, jobTableShapes[1].schema)
	first := jobwatch.JobTable{Pending: "finished_at IS NULL AND expired_at IS NULL", RunAt: "run_at"}
	second := jobwatch.JobTable{Pending: "finished_at IS NULL", RunAt: "run_at", Queue: "queue"}
	wa, _, _ := d.watch(t, opt, watchSetup{table: "que_jobs", noTable: true, interval: 300 * time.Millisecond,
		opts: []jobwatch.Option{jobwatch.WithJobTable(first), jobwatch.WithJitter(0), jobwatch.WithFallbackPollInterval(100 * time.Millisecond)}})
	_, _, _ = d.watch(t, opt, watchSetup{table: "que_jobs", noTable: true, interval: 100 * time.Millisecond,
		opts: []jobwatch.Option{jobwatch.WithJobTable(second), jobwatch.WithJitter(0)}})
	eventually(t, "the first watch's error", func() bool { return logs.lines("made for another job table description") >= 1 })
	eventually(t, "the first watch polls at its fallback interval", func() bool { return wa.Stats().PollInterval == 100*time.Millisecond })
	polls := wa.Stats().Polls
	eventually(t, "more checks", func() bool { return wa.Stats().Polls >= polls+3 })
	assert.Equal(t, 1, logs.lines("replacing notification triggers made for another job table description"), logs.String())
	assert.Equal(t, 1, logs.lines("level=ERROR"), logs.String())
	var body string
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT prosrc FROM pg_proc WHERE proname = 'jobwatch_notify_que_jobs'").Scan(&body))
	assert.Contains(t, body, `"queue" : "queue"`, "the second description's function was replaced")

	findings, err := jobwatch.Diagnose(ctxT(t), d.pool, d.url, "que_jobs", jobwatch.WithJobTable(first))
	require.NoError(t, err)
	f := finding(findings, "triggers")
	assert.Equal(t, jobwatch.StatusFail, f.Status, f.Detail)
	assert.Contains(t, f.Detail, "another job table description")
	findings, err = jobwatch.Diagnose(ctxT(t), d.pool, d.url, "que_jobs", jobwatch.WithJobTable(second))
	require.NoError(t, err)
	for _, f := range findings {
		if f.Check != "delivery" {
			assert.Equal(t, jobwatch.StatusOK, f.Status, "%s: %s", f.Check, f.Detail)
		}
	}
	// A migration replaces it.
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "que_jobs", jobwatch.WithJobTable(first)))
	findings, err = jobwatch.Diagnose(ctxT(t), d.pool, d.url, "que_jobs", jobwatch.WithJobTable(first))
	require.NoError(t, err)
	assert.Equal(t, jobwatch.StatusOK, finding(findings, "triggers").Status)
}

// TestJobTableClockSkew: a worker whose clock is 1s behind the server's
// finds nothing when first woken for a job due now; WithClockSkew wakes it
// again while the job is due, and it runs within the skew.
func TestJobTableClockSkew(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, jobTableShapes[0].schema)
	w, ch, _ := d.watch(t, opt, watchSetup{table: "gue_jobs", noTable: true,
		opts: []jobwatch.Option{jobwatch.WithJobTable(jobTableShapes[0].desc), jobwatch.WithClockSkew(3 * time.Second)}})
	fetch := func() bool { // gue's WorkOne, with the worker's clock
		tag, err := d.pool.Exec(ctxT(t), "DELETE FROM gue_jobs WHERE run_at <= $1", time.Now().Add(-time.Second))
		require.NoError(t, err)
		return tag.RowsAffected() > 0
	}
	d.exec(t, "INSERT INTO gue_jobs (run_at) VALUES (now())")
	wakes := 0
	for done := false; !done; {
		waitWake(t, ch, "a wake-up while the job is due")
		wakes++
		done = fetch()
	}
	assert.Greater(t, wakes, 1)
	eventually(t, "the later wake-ups counted", func() bool { return w.Stats().Wakeups.Scheduled > 0 })
}

// TestJobTableGate: with the notify gate (on by default), the jobs of
// transactions that skipped their NOTIFY behind an open holder are woken
// by the watch's gate poll, which reads the table and its skip counter on
// the pinned search_path; with queues, only those of the watch's queue.
func TestJobTableGate(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, jobTableShapes[0].schema)
	w, ch, _ := d.watch(t, opt, watchSetup{table: "gue_jobs", noTable: true,
		opts: []jobwatch.Option{jobwatch.WithJobTable(jobTableShapes[0].desc), jobwatch.WithQueues("a")}})
	tx, err := d.pool.Begin(ctxT(t))
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(ctxT(t)) })
	_, err = tx.Exec(ctxT(t), "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), 'held')")
	require.NoError(t, err)
	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), 'b')")
	d.exec(t, "INSERT INTO gue_jobs (run_at, queue) VALUES (now(), 'a')")
	waitWake(t, ch, "the skipped job of queue a")
	assert.Zero(t, w.Stats().Notifications, "the skippers notified")
	eventually(t, "the wake-up counted", func() bool { st := w.Stats(); return st.Wakeups.Gate+st.Wakeups.Poll == 1 })
	require.NoError(t, tx.Commit(ctxT(t)))
}

// TestJobTableAppearsLater: a watch started before its table exists
// installs the triggers for its description when the table appears, and
// its polls find the jobs.
func TestJobTableAppearsLater(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := d.watch(t, opt, watchSetup{table: "que_jobs", noTable: true, interval: 50 * time.Millisecond,
		opts: []jobwatch.Option{jobwatch.WithJobTable(jobTableShapes[1].desc), jobwatch.WithInstallBackoff(20*time.Millisecond, 20*time.Millisecond)}})
	d.exec(t, jobTableShapes[1].schema)
	d.exec(t, "INSERT INTO que_jobs (run_at) VALUES (now())")
	waitWake(t, ch, "the job, found by a poll")
	eventually(t, "the triggers", func() bool { return triggersHealthy(t, d.pool, "que_jobs") })
	d.exec(t, "DELETE FROM que_jobs")
	drain(ch)
	n := w.Stats().Notifications
	d.exec(t, "INSERT INTO que_jobs (run_at) VALUES (NULL)")
	waitWake(t, ch, "the job, notified")
	assert.Greater(t, w.Stats().Notifications, n)
}

// TestJobTableRefusedLater: a description that does not fit a table that
// appears after the watch started is said in one error line, and the
// watch keeps trying.
func TestJobTableRefusedLater(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	logs, opt := newLogs(t)
	w, _, _ := d.watch(t, opt, watchSetup{table: "que_jobs", noTable: true, interval: 20 * time.Millisecond,
		opts: []jobwatch.Option{jobwatch.WithJobTable(jobwatch.JobTable{RunAt: "due_at"}), jobwatch.WithInstallBackoff(20*time.Millisecond, 20*time.Millisecond)}})
	d.exec(t, jobTableShapes[1].schema)
	eventually(t, "the error", func() bool { return logs.lines("cannot be watched") == 1 })
	polls := w.Stats().Polls
	eventually(t, "more polls", func() bool { return w.Stats().Polls > polls+5 })
	assert.Equal(t, 1, logs.lines("level=ERROR"), logs.String())
	assert.ErrorIs(t, w.Stats().LastError, jobwatch.ErrInvalidJobTable)
}

// TestJobTablePendingPrintedOnManyLines: PostgreSQL prints a CASE, and a
// literal holding a newline, over several lines; the trigger runs them as
// the condition they are, and text after a newline inside a literal stays
// in the literal (it once ended up as code of the function body).
func TestJobTablePendingPrintedOnManyLines(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, `CREATE TABLE pwned (n int); GRANT INSERT ON pwned TO PUBLIC;
		CREATE TABLE cjobs (id bigserial, state text NOT NULL DEFAULT 'ready', run_at timestamptz)`)
	desc := jobwatch.JobTable{RunAt: "run_at",
		Pending: "CASE WHEN state = 'ready' THEN true ELSE false END AND state <> 'x\nINSERT INTO pwned SELECT 42; --'"}
	w, ch, _ := d.watch(t, opt, watchSetup{table: "cjobs", noTable: true, opts: []jobwatch.Option{jobwatch.WithJobTable(desc)}})
	d.exec(t, "INSERT INTO cjobs (state) VALUES ('done')")
	d.exec(t, "INSERT INTO cjobs DEFAULT VALUES")
	waitWake(t, ch, "the ready job")
	assert.Equal(t, uint64(1), w.Stats().Notifications, "the done job notified")
	var pwned int
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT count(*) FROM pwned").Scan(&pwned))
	assert.Zero(t, pwned, "text of a literal ran as code")
}

// TestJobTableReadingWithBackslash: a Pending whose reading holds a
// backslash (here written without one) is refused: it would read
// differently in a session with standard_conforming_strings off.
func TestJobTableReadingWithBackslash(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.exec(t, "CREATE TABLE bjobs (id bigserial, kind text)")
	err := jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "bjobs",
		jobwatch.WithJobTable(jobwatch.JobTable{Pending: "kind <> U&'!005C' UESCAPE '!'"}))
	require.ErrorIs(t, err, jobwatch.ErrInvalidJobTable)
	assert.Contains(t, err.Error(), "backslash")
}

// TestJobTableWithoutTempRight: reading Pending needs the right to create
// temporary tables; a role without it is told so, not that its
// description is wrong.
func TestJobTableWithoutTempRight(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.exec(t, "CREATE TABLE tjobs (id bigserial, state text)")
	worker := role(t, d)
	d.exec(t, "GRANT SELECT ON tjobs TO "+worker)
	var db string
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT current_database()").Scan(&db))
	d.exec(t, "REVOKE TEMPORARY ON DATABASE "+db+" FROM PUBLIC")
	pool := poolAs(t, d, worker)
	err := jobwatch.EnsureNotificationTriggers(ctxT(t), pool, "tjobs", jobwatch.WithJobTable(jobwatch.JobTable{Pending: "state = 'x'"}))
	require.ErrorIs(t, err, jobwatch.ErrPermissionDenied)
	assert.NotErrorIs(t, err, jobwatch.ErrInvalidJobTable)
	assert.Contains(t, err.Error(), "GRANT TEMPORARY")
}
