package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/jobwatchtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vgarvardt/gue/v5"
	"github.com/vgarvardt/gue/v5/adapter/pgxv5"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { jobwatchtest.Main(leakCheck{m}) }

// leakCheck runs the tests, then fails the run if a goroutine they started
// (the library's and gue's included) is still running.
type leakCheck struct{ m *testing.M }

func (l leakCheck) Run() int {
	code := l.m.Run()
	if code == 0 {
		// jobwatchtest's ephemeral server, if it started one, is stopped
		// after this check; its goroutine waits for the server process.
		server := goleak.IgnoreAnyFunction("github.com/jobwatch-go/jobwatch/internal/pgtest.(*Cluster).Start.func1")
		if err := goleak.Find(server); err != nil {
			fmt.Println("goroutine leak:", err)
			return 1
		}
	}
	return code
}

// pollInterval is so long that, within a test, only jobwatch's wake-ups
// for notifications and due times can start a job.
const pollInterval = time.Hour

// bound is how soon a job must start once it may: far under gue's own 5 s
// poll, and generous for a loaded machine. (The bench measures how fast.)
const bound = 2 * time.Second

// runner is one worker of the example, running work on a fresh database.
type runner struct {
	t      *testing.T
	pool   *pgxpool.Pool
	client *gue.Client
	watch  *jobwatch.Watch
	stop   func()
}

// start creates gue's table in a fresh database and runs work for queue
// with the handlers of wm, until the test ends (or stop).
func start(t *testing.T, queue string, wm gue.WorkMap, opts ...gue.ClientOption) *runner {
	t.Helper()
	pool := jobwatchtest.NewDatabase(t)
	ctx := context.Background()
	_, err := pool.Exec(ctx, schemaSQL)
	require.NoError(t, err)
	client, err := gue.NewClient(pgxv5.NewConnPool(pool), opts...)
	require.NoError(t, err)
	worker, err := gue.NewWorker(client, wm, gue.WithWorkerQueue(queue))
	require.NoError(t, err)
	listener, err := jobwatch.NewListener(pool.Config().ConnString())
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(ctx)
	started := make(chan *jobwatch.Watch, 1)
	done := make(chan error, 1)
	go func() {
		done <- work(ctx, pool, listener, worker, queue, 4, pollInterval, func(w *jobwatch.Watch) { started <- w })
	}()
	r := &runner{t: t, pool: pool, client: client}
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, listener.Close())
		})
	}
	t.Cleanup(r.stop) // before the pool closes and the database is dropped
	select {
	case r.watch = <-started:
	case err := <-done:
		done <- nil // for stop: work has returned
		t.Fatalf("work: %v", err)
	}
	// The watch's first poll, of an empty table, has run: from now on
	// only the tests' jobs call for wake-ups.
	require.Eventually(t, func() bool { return r.watch.Stats().Polls >= 1 }, 10*time.Second, time.Millisecond)
	return r
}

// enqueue enqueues j with gue's client and returns when it did.
func (r *runner) enqueue(j *gue.Job) time.Time {
	r.t.Helper()
	require.NoError(r.t, r.client.Enqueue(context.Background(), j))
	return time.Now()
}

// jobsLeft counts queue's jobs in gue_jobs (a running job is still there).
func (r *runner) jobsLeft(queue string) int {
	r.t.Helper()
	var n int
	require.NoError(r.t, r.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM gue_jobs WHERE queue = $1`, queue).Scan(&n))
	return n
}

// waitStart returns the next start a handler reported, failing the test
// when none comes within timeout.
func waitStart(t *testing.T, starts <-chan began, timeout time.Duration) began {
	t.Helper()
	select {
	case s := <-starts:
		return s
	case <-time.After(timeout):
		t.Fatalf("no job started within %v", timeout)
		return began{}
	}
}

// began is a handler's report of a job it began.
type began struct {
	at         time.Time // the worker's clock, which gue compares run_at with
	runAt      time.Time // the job's run_at
	errorCount int32     // the job's failures so far
}

// recorder is a handler that reports each job it begins on starts, then
// returns fail's result for it (nil: success).
func recorder(starts chan<- began, fail func(j *gue.Job) error) gue.WorkFunc {
	return func(ctx context.Context, j *gue.Job) error {
		starts <- began{at: time.Now(), runAt: j.RunAt, errorCount: j.ErrorCount}
		if fail != nil {
			return fail(j)
		}
		return nil
	}
}

// TestLoneJobsStartAtOnce: a job enqueued with gue's Client.Enqueue, alone,
// starts on the notification of its INSERT, not at a poll.
func TestLoneJobsStartAtOnce(t *testing.T) {
	t.Parallel()
	starts := make(chan began, 10)
	r := start(t, "lone", gue.WorkMap{"lone": recorder(starts, nil)})
	var waits []time.Duration
	for range 10 {
		enqueued := time.Now()
		r.enqueue(&gue.Job{Type: "lone", Queue: "lone"})
		s := waitStart(t, starts, 10*time.Second)
		waits = append(waits, s.at.Sub(enqueued))
	}
	sort.Slice(waits, func(i, j int) bool { return waits[i] < waits[j] })
	t.Logf("enqueue to start, 10 lone jobs: median %v, max %v", waits[len(waits)/2], waits[len(waits)-1])
	assert.Less(t, waits[len(waits)-1], bound, "a lone job starts on its notification")
	require.Eventually(t, func() bool { return r.jobsLeft("lone") == 0 }, 10*time.Second, 10*time.Millisecond)
	st := r.watch.Stats()
	assert.GreaterOrEqual(t, st.Wakeups.Notification, uint64(1), "%+v", st)
	assert.Zero(t, st.Wakeups.Poll, "no job waited for a poll: %+v", st)
}

// TestScheduledJobStartsWhenDue: a job enqueued with a RunAt 1.5 s ahead
// starts at or after it, soon after, woken at its due time.
func TestScheduledJobStartsWhenDue(t *testing.T) {
	t.Parallel()
	starts := make(chan began, 1)
	r := start(t, "later", gue.WorkMap{"later": recorder(starts, nil)})
	runAt := time.Now().Add(1500 * time.Millisecond)
	r.enqueue(&gue.Job{Type: "later", Queue: "later", RunAt: runAt})
	s := waitStart(t, starts, 1500*time.Millisecond+10*time.Second)
	assert.WithinDuration(t, runAt, s.runAt, time.Microsecond, "run_at as enqueued, to the microsecond")
	late := s.at.Sub(s.runAt)
	t.Logf("scheduled job started %v after its run_at", late)
	assert.GreaterOrEqual(t, late, time.Duration(0), "not before its run_at")
	assert.Less(t, late, bound, "soon after its run_at")
	st := r.watch.Stats()
	assert.GreaterOrEqual(t, st.Wakeups.Scheduled, uint64(1), "woken at its due time: %+v", st)
}

// TestRetryStartsAtBackoff: a job that fails once is retried at the run_at
// gue's backoff gives it (500 ms after the failure), and succeeds.
func TestRetryStartsAtBackoff(t *testing.T) {
	t.Parallel()
	const backoff = 500 * time.Millisecond
	starts := make(chan began, 2)
	failOnce := func(j *gue.Job) error {
		if j.ErrorCount == 0 {
			return errors.New("first attempt fails")
		}
		return nil
	}
	r := start(t, "retry", gue.WorkMap{"flaky": recorder(starts, failOnce)},
		gue.WithClientBackoff(gue.NewConstantBackoff(backoff)))
	r.enqueue(&gue.Job{Type: "flaky", Queue: "retry"})
	first := waitStart(t, starts, 10*time.Second)
	require.Equal(t, int32(0), first.errorCount)
	retry := waitStart(t, starts, backoff+10*time.Second)
	require.Equal(t, int32(1), retry.errorCount)
	// gue set run_at to its clock after the failure plus the backoff.
	// (Truncated as run_at is stored, to the microsecond.)
	assert.GreaterOrEqual(t, retry.runAt.Sub(first.at.Truncate(time.Microsecond)), backoff,
		"run_at is the backoff after the failure")
	late := retry.at.Sub(retry.runAt)
	t.Logf("retry: run_at %v after the first start, started %v after its run_at",
		retry.runAt.Sub(first.at), late)
	assert.GreaterOrEqual(t, late, time.Duration(0), "the retry starts at or after its run_at")
	assert.Less(t, late, bound, "soon after its run_at")
	require.Eventually(t, func() bool { return r.jobsLeft("retry") == 0 }, 10*time.Second, 10*time.Millisecond,
		"the retry succeeded and gue deleted the job")
	st := r.watch.Stats()
	assert.GreaterOrEqual(t, st.Wakeups.Scheduled, uint64(1), "the retry was woken at its run_at: %+v", st)
	assert.Zero(t, st.Wakeups.Poll, "%+v", st)
}

// TestOtherQueueDoesNotWake: a job of another queue neither runs nor wakes
// the worker, on its notification or at a poll, while a job of the
// worker's queue enqueued after it runs at once.
func TestOtherQueueDoesNotWake(t *testing.T) {
	t.Parallel()
	ours, others := make(chan began, 1), make(chan began, 1)
	r := start(t, "ours", gue.WorkMap{"ours": recorder(ours, nil), "other": recorder(others, nil)})
	ctx := context.Background()
	channel := jobwatch.ChannelName("gue_jobs")

	// The other queue's job, then a poll asked for through the channel:
	// the Listener hands the watch its notifications in order, so once the
	// poll has run, the job's own notification has been handled too.
	r.enqueue(&gue.Job{Type: "other", Queue: "other"})
	polls := r.watch.Stats().Polls
	_, err := r.pool.Exec(ctx, `SELECT pg_notify($1, 'poll')`, channel)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return r.watch.Stats().Polls > polls }, 10*time.Second, time.Millisecond)
	st := r.watch.Stats()
	assert.Zero(t, st.WakeupsSent, "the other queue's job woke no one: %+v", st)

	// Ours, enqueued after it, runs at once; the other one never does.
	enqueued := r.enqueue(&gue.Job{Type: "ours", Queue: "ours"})
	s := waitStart(t, ours, 10*time.Second)
	assert.Less(t, s.at.Sub(enqueued), bound)
	require.Eventually(t, func() bool { return r.jobsLeft("ours") == 0 }, 10*time.Second, 10*time.Millisecond)
	r.stop() // every handler has returned
	assert.Empty(t, others, "the other queue's job never ran")
	assert.Equal(t, 1, r.jobsLeft("other"), "the other queue's job is still waiting")
	// A poll counts itself in Polls just before it sends its wake-ups, so
	// the check above could miss a late one: by cause, at the end.
	st = r.watch.Stats()
	assert.Equal(t, uint64(1), st.Wakeups.Notification, "one wake-up by notification, ours: %+v", st)
	assert.Zero(t, st.Wakeups.Poll, "no poll woke the worker for the other queue's job: %+v", st)
}
