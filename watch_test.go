package jobwatch_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jobwatch-go/jobwatch"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWakeOnInsert(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "insert")
	assert.EqualValues(t, 1, w.Stats().Notifications)
}

func TestWakeOnUpdateToRetry(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	d.exec(t, "INSERT INTO jobs (status) VALUES ('job_status_running')")
	d.exec(t, "UPDATE jobs SET status = 'job_status_failed'")
	d.exec(t, "UPDATE jobs SET status = 'job_status_retry'")
	waitWake(t, ch, "update to retry")
	// Notifications arrive in commit order: the running insert and the
	// failed update would have come first.
	assert.EqualValues(t, 1, w.Stats().Notifications)
}

func TestNoWakeForFinishedJob(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	d.exec(t, "INSERT INTO jobs (status) VALUES ('job_status_succeeded'), ('job_status_failed')")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "pending insert")
	assert.EqualValues(t, 1, w.Stats().Notifications, "only the pending job's statement notifies")
	assert.Equal(t, 0, drain(ch))
}

func TestOneNotificationPerStatement(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	d.exec(t, "INSERT INTO jobs SELECT FROM generate_series(1, 1000)")
	// One notification for the statement, carrying the count, fills the
	// channel: every worker wakes, none is told twice.
	eventually(t, "bulk insert wakes as many workers as the channel holds", func() bool { return len(ch) == cap(ch) })
	assert.EqualValues(t, 1, w.Stats().Notifications)
	assert.EqualValues(t, 0, w.Stats().WakeupsDropped)
	drain(ch)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "second insert")
	assert.EqualValues(t, 2, w.Stats().Notifications)
	assert.Equal(t, 0, drain(ch), "one job, one wake-up")
}

func TestScheduledJobWokenWhenDue(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt, jobwatch.WithJitter(0))
	d.exec(t, "INSERT INTO jobs (run_at) VALUES (now() + interval '300 milliseconds')")
	waitWake(t, ch, "scheduled job")
	var due bool
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT run_at <= now() FROM jobs").Scan(&due))
	assert.True(t, due, "woken before run_at")
	eventually(t, "the due-time poll counted", func() bool { return w.Stats().Polls >= 2 })
}

func TestPollerFindsScheduledJobWithoutNotifications(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	d.exec(t, "INSERT INTO jobs (run_at) VALUES (now() + interval '400 milliseconds')")
	ch := make(chan jobwatch.Message, 10)
	p, err := jobwatch.PollForJob(ctxT(t), false, d.pool, "jobs", time.Hour, ch, opt, jobwatch.WithJitter(0))
	require.NoError(t, err)
	defer p.Close()
	waitWake(t, ch, "scheduled job found by the poller")
	var due bool
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT run_at <= now() FROM jobs").Scan(&due))
	assert.True(t, due)
}

func TestPollerSendsOnePerPendingJobBounded(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	d.exec(t, "INSERT INTO jobs SELECT FROM generate_series(1, 5)")
	d.exec(t, "INSERT INTO jobs (status) SELECT 'job_status_succeeded' FROM generate_series(1, 5)")
	d.exec(t, "INSERT INTO jobs (locked_by) VALUES (gen_random_uuid())")

	ch := make(chan jobwatch.Message, 10)
	p, err := jobwatch.PollForJob(ctxT(t), false, d.pool, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	eventually(t, "first poll", func() bool { return p.Stats().Polls >= 1 && len(ch) > 0 })
	require.NoError(t, p.Close())
	assert.Equal(t, 5, len(ch), "one per pending job")

	small := make(chan jobwatch.Message, 3)
	p, err = jobwatch.PollForJob(ctxT(t), false, d.pool, "jobs", time.Hour, small, opt)
	require.NoError(t, err)
	eventually(t, "first poll", func() bool { return p.Stats().Polls >= 1 && len(small) == 3 })
	require.NoError(t, p.Close())
	assert.EqualValues(t, 0, p.Stats().WakeupsDropped, "the poll counts only what the channel can take")
}

func TestPollerRepairOnAndOff(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		repair  bool
		repairs uint64
	}{{repair: true, repairs: 1}, {repair: false, repairs: 0}} {
		t.Run(fmt.Sprint("repair=", c.repair), func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			d.jobTable(t, "jobs")
			ctx := ctxT(t)
			require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt))
			d.exec(t, "DROP TRIGGER did_insert_job_jobs ON jobs")
			ch := make(chan jobwatch.Message, 10)
			p, err := jobwatch.PollForJob(ctx, c.repair, d.pool, "jobs", 20*time.Millisecond, ch, opt, jobwatch.WithJitter(0))
			require.NoError(t, err)
			defer p.Close()
			// Without repair the poller has no installer: after its polls
			// nothing can have changed. With it the repair is on the
			// installer's goroutine.
			eventually(t, "polls and repairs", func() bool { return p.Stats().Polls >= 3 && p.Stats().TriggerRepairs == c.repairs })
			assert.Equal(t, c.repair, triggersHealthy(t, d.pool, "jobs"))
		})
	}
}

func TestTableDroppedAndRecreated(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", 20*time.Millisecond, 10, opt, jobwatch.WithJitter(0))
	d.exec(t, "DROP TABLE jobs")
	eventually(t, "a poll error", func() bool { return w.Stats().PollErrors >= 1 })
	d.jobTable(t, "jobs")
	eventually(t, "triggers repaired", func() bool {
		ok, _ := jobwatch.NotificationTriggersHealthy(ctxT(t), d.pool, "jobs")
		return ok
	})
	eventually(t, "polls succeed", func() bool {
		s := w.Stats()
		polls, errs := s.Polls, s.PollErrors
		eventually(t, "next poll", func() bool { return w.Stats().Polls > polls })
		return w.Stats().PollErrors == errs
	})
	drain(ch)
	before := w.Stats().Notifications
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	eventually(t, "notification from the recreated triggers", func() bool { return w.Stats().Notifications > before })
	assert.Contains(t, lg.String(), "poll failed")
}

func TestWatchStopsOnCloseAndContextCancel(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	l := testListener(t, d.url, opt)
	ch := make(chan jobwatch.Message, 10)

	ctx, cancel := context.WithCancel(context.Background())
	w, err := jobwatch.WatchForJob(ctx, d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	settle(t, w, ch)
	cancel()
	<-w.Done()
	assert.Equal(t, 0, l.Stats().Subscriptions, "unsubscribed")
	require.NoError(t, w.Close())
	require.NoError(t, w.Close(), "Close is idempotent")

	w2, err := jobwatch.WatchForJob(context.Background(), d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	settle(t, w2, ch)
	require.NoError(t, w2.Close())
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	// A second, live watch on the same listener proves the insert was
	// notified; the closed ones must not have passed it on.
	ch3 := make(chan jobwatch.Message, 10)
	w3, err := jobwatch.WatchForJob(context.Background(), d.pool, l, "jobs", time.Hour, ch3, opt)
	require.NoError(t, err)
	defer w3.Close()
	settle(t, w3, ch3)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch3, "live watch")
	assert.Equal(t, 0, drain(ch), "closed watches send nothing")
}

func TestBadArguments(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	l := testListener(t, d.url)
	ctx := ctxT(t)
	ch := make(chan jobwatch.Message, 1)
	cases := []struct {
		name string
		err  error
		call func() error
	}{
		{"empty table", jobwatch.ErrInvalidTableName, func() error {
			_, err := jobwatch.WatchForJob(ctx, d.pool, l, "", time.Second, ch)
			return err
		}},
		{"nil pool", jobwatch.ErrNilPool, func() error {
			_, err := jobwatch.WatchForJob(ctx, nil, l, "jobs", time.Second, ch)
			return err
		}},
		{"nil listener", jobwatch.ErrNilListener, func() error {
			_, err := jobwatch.WatchForJob(ctx, d.pool, nil, "jobs", time.Second, ch)
			return err
		}},
		{"nil channel", jobwatch.ErrNilChannel, func() error {
			_, err := jobwatch.WatchForJob(ctx, d.pool, l, "jobs", time.Second, nil)
			return err
		}},
		{"unbuffered channel", jobwatch.ErrUnbufferedChannel, func() error {
			_, err := jobwatch.PollForJob(ctx, true, d.pool, "jobs", time.Second, make(chan jobwatch.Message))
			return err
		}},
		{"zero interval", jobwatch.ErrInvalidPollInterval, func() error {
			_, err := jobwatch.PollForJob(ctx, true, d.pool, "jobs", 0, ch)
			return err
		}},
		{"negative interval", jobwatch.ErrInvalidPollInterval, func() error {
			_, err := jobwatch.WatchForJob(ctx, d.pool, l, "jobs", -time.Second, ch)
			return err
		}},
		{"missing table", jobwatch.ErrTableNotFound, func() error {
			return jobwatch.EnsureNotificationTriggers(ctx, d.pool, "no_such_table")
		}},
		{"missing schema", jobwatch.ErrTableNotFound, func() error {
			return jobwatch.EnsureNotificationTriggers(ctx, d.pool, "no_such_schema.jobs")
		}},
		{"missing table, healthy", jobwatch.ErrTableNotFound, func() error {
			_, err := jobwatch.NotificationTriggersHealthy(ctx, d.pool, "no_such_table")
			return err
		}},
		{"nil pool, ensure", jobwatch.ErrNilPool, func() error {
			return jobwatch.EnsureNotificationTriggers(ctx, nil, "jobs")
		}},
		{"injection", jobwatch.ErrInvalidTableName, func() error {
			return jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs; DROP TABLE jobs")
		}},
	}
	for _, c := range cases {
		err := c.call()
		require.Error(t, err, c.name)
		assert.ErrorIs(t, err, c.err, c.name)
	}

	d.exec(t, "CREATE TABLE not_jobs (id int, status text)")
	err := jobwatch.EnsureNotificationTriggers(ctx, d.pool, "not_jobs")
	require.ErrorIs(t, err, jobwatch.ErrMissingColumns)
	assert.Contains(t, err.Error(), "not_jobs")
	assert.Contains(t, err.Error(), "run_at, locked_by")

	d.exec(t, "CREATE TABLE text_run_at (status text, locked_by uuid, run_at text)")
	err = jobwatch.EnsureNotificationTriggers(ctx, d.pool, "text_run_at")
	require.ErrorIs(t, err, jobwatch.ErrColumnType)
	assert.Contains(t, err.Error(), "run_at")
	d.exec(t, "INSERT INTO text_run_at VALUES ('job_status_not_started', NULL, 'soon')") // no trigger was installed

	_, err = jobwatch.NewListener("postgres://%zz")
	assert.Error(t, err, "unparsable connection string")

	closed := testListener(t, d.url)
	require.NoError(t, closed.Close())
	_, err = closed.Subscribe("x", func(jobwatch.Notification) {})
	assert.ErrorIs(t, err, jobwatch.ErrListenerClosed)
	_, err = jobwatch.WatchForJob(ctx, d.pool, closed, "jobs", time.Second, ch)
	assert.ErrorIs(t, err, jobwatch.ErrListenerClosed)
}

// TestIHPCompatibility: IHP's own per-row triggers satisfy the health
// check and wake a Go watcher; jobwatch's triggers serve a plain LISTEN on
// IHP's channel.
func TestIHPCompatibility(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)
	// IHP's per-row triggers, as IHP/Job/Queue/Watch.hs creates them.
	d.exec(t, `CREATE FUNCTION notify_job_queued_jobs() RETURNS TRIGGER AS $$
BEGIN PERFORM pg_notify('job_available_jobs', ''); RETURN new; END; $$ language plpgsql;
CREATE TRIGGER did_insert_job_jobs AFTER INSERT ON "jobs" FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE notify_job_queued_jobs();
CREATE TRIGGER did_update_job_jobs AFTER UPDATE ON "jobs" FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE notify_job_queued_jobs();`)
	require.True(t, triggersHealthy(t, d.pool, "jobs"))

	ch := make(chan jobwatch.Message, 10)
	l := testListener(t, d.url, opt)
	w, err := jobwatch.WatchForJob(ctx, d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	defer w.Close()
	settle(t, w, ch)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "IHP's row trigger, jobwatch's function")

	// Now jobwatch's triggers, heard by a plain LISTEN as IHP does it.
	d.exec(t, "DROP TRIGGER did_insert_job_jobs ON jobs; DROP TRIGGER did_update_job_jobs ON jobs")
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt))
	conn, err := pgx.Connect(ctx, d.url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "LISTEN job_available_jobs")
	require.NoError(t, err)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	n, err := conn.WaitForNotification(ctx)
	require.NoError(t, err)
	assert.Equal(t, "job_available_jobs", n.Channel)
	assert.Equal(t, "g:", withoutKey(t, n.Payload), "one due job, from the notify gate's holder")
}

// TestStatusAsText: a text status column works like the enum.
func TestStatusAsText(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, `CREATE TABLE jobs (id serial primary key, status text NOT NULL DEFAULT 'job_status_not_started',
		locked_by uuid, run_at timestamptz NOT NULL DEFAULT now())`)
	ch := make(chan jobwatch.Message, 10)
	l := testListener(t, d.url, opt)
	w, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	defer w.Close()
	settle(t, w, ch)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "text status")
	assert.NoError(t, w.Stats().LastError)
}

func TestMessageString(t *testing.T) {
	assert.Equal(t, "JobAvailable", jobwatch.JobAvailable.String())
	assert.Equal(t, "Stop", jobwatch.Stop.String())
	assert.True(t, strings.HasPrefix(jobwatch.Message(9).String(), "Message("))
}

// TestStartCloseKeepsPoolConnections: 200 watches started and closed in
// turn on a 4-connection pool. Close lets a query in flight finish rather
// than cancel it (pgx discards a connection whose query was cancelled),
// so the pool never opens more than its 4 connections.
func TestStartCloseKeepsPoolConnections(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	pool := newPool(t, d.with(t, "pool_max_conns", "4"))
	l := testListener(t, d.url, opt)
	for range 200 {
		ch := make(chan jobwatch.Message, 4)
		w, err := jobwatch.WatchForJob(ctxT(t), pool, l, "jobs", 10*time.Millisecond, ch, opt, jobwatch.WithJitter(0))
		require.NoError(t, err)
		require.NoError(t, w.Close())
	}
	assert.LessOrEqual(t, pool.Stat().NewConnsCount(), int64(4), "connections opened")
}

// TestWakeupCauses: Stats counts each wake-up by what called for it.
func TestWakeupCauses(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES") // before the watch: its first poll finds it
	w, ch, _ := d.watch(t, opt, watchSetup{noTable: true, listener: testListener(t, d.with(t, "application_name", "jobwatch_causes"), opt)})
	eventually(t, "the first poll's wake-up", func() bool { return w.Stats().Wakeups.Poll >= 1 })
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "notification")
	eventually(t, "counted", func() bool { return w.Stats().Wakeups.Notification >= 1 })
	d.exec(t, "INSERT INTO jobs (run_at) VALUES (now() + interval '200 milliseconds')")
	eventually(t, "the scheduled job's moment", func() bool { return w.Stats().Wakeups.Scheduled >= 1 })
	d.exec(t, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jobwatch_causes' AND datname = current_database()")
	eventually(t, "the catch-up after the reconnect", func() bool { return w.Stats().Wakeups.Reconnect >= 1 })
	drain(ch) // room for the gate's wake-up
	tx, _ := holder(t, d)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES") // skips behind the holder
	eventually(t, "found behind the gate", func() bool { return w.Stats().Wakeups.Gate >= 1 })
	require.NoError(t, tx.Rollback(ctxT(t)))
	s := w.Stats()
	assert.Equal(t, s.WakeupsSent, s.Wakeups.Notification+s.Wakeups.Poll+s.Wakeups.Scheduled+s.Wakeups.Gate+s.Wakeups.Reconnect)
	drain(ch)
}
