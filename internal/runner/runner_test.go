package runner

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { pgtest.Main(leakCheck{m}) }

type leakCheck struct{ m *testing.M }

func (l leakCheck) Run() int {
	code := l.m.Run()
	if code == 0 {
		// pgtest's ephemeral server, if it started one, is stopped after
		// this check; its goroutine waits for the server process.
		server := goleak.IgnoreAnyFunction("github.com/jobwatch-go/jobwatch/internal/pgtest.(*Cluster).Start.func1")
		if err := goleak.Find(server); err != nil {
			println("goroutines left running:", err.Error())
			return 1
		}
	}
	return code
}

// TestReadAhead: while jobs run shorter than a fetch takes, a fetch locks
// up to Concurrency jobs more than there are free slots; they start as
// slots free up, never more than Concurrency at once. At shutdown the ones
// not started go back in the queue, their attempt not counted, and a later
// worker runs every job exactly once.
func TestReadAhead(t *testing.T) {
	ctx, cancelTest := context.WithTimeout(context.Background(), time.Minute)
	defer cancelTest()
	url, drop, err := pgtest.CreateDatabase(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, drop()) })
	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	defer pool.Close()
	require.NoError(t, CreateTable(ctx, pool, "jobs"))
	count := func(sql string) int {
		var n int
		require.NoError(t, pool.QueryRow(ctx, sql).Scan(&n))
		return n
	}

	const concurrency = 4
	var started, inFlight, most atomic.Int64
	gate := make(chan struct{})
	var blocking atomic.Bool
	run := func(stop context.Context) (chan Counts, func()) {
		l, err := jobwatch.NewListener(url)
		require.NoError(t, err)
		runCtx, cancel := context.WithCancel(stop)
		ready := make(chan struct{})
		done := make(chan Counts, 1)
		go func() {
			defer l.Close()
			c, err := Run(runCtx, pool, l, Config{
				Table: "jobs", Concurrency: concurrency, PollInterval: time.Minute, StaleAfter: time.Hour, MaxAttempts: 1,
				Logger: slog.New(slog.DiscardHandler),
				Perform: func(context.Context, int) error {
					n := inFlight.Add(1)
					defer inFlight.Add(-1)
					for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
					}
					if blocking.Load() {
						<-gate
					}
					return nil
				},
				Started: func(pgtype.UUID) { started.Add(1) },
				Ready:   func() { close(ready) },
			})
			assert.NoError(t, err)
			done <- c
		}()
		<-ready
		return done, cancel
	}

	done, cancel := run(ctx)
	// Quick jobs first: the worker learns that they run shorter than a fetch.
	_, err = pool.Exec(ctx, "INSERT INTO jobs SELECT FROM generate_series(1, 200)")
	require.NoError(t, err)
	waitFor(t, "the quick jobs done", func() bool {
		return count("SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == 200
	})

	// Now jobs that hold their slot: Concurrency run, Concurrency more are
	// locked and wait.
	blocking.Store(true)
	_, err = pool.Exec(ctx, "INSERT INTO jobs SELECT FROM generate_series(1, 3 * $1::int)", concurrency)
	require.NoError(t, err)
	waitFor(t, "Concurrency jobs started", func() bool { return inFlight.Load() == concurrency })
	waitFor(t, "twice Concurrency jobs locked", func() bool {
		return count("SELECT count(*) FROM jobs WHERE status = 'job_status_running'") == 2*concurrency
	})
	assert.EqualValues(t, 200+concurrency, started.Load(), "only Concurrency jobs started")
	cancel()
	close(gate)
	c := <-done
	assert.EqualValues(t, 200+concurrency, c.Ran)
	assert.EqualValues(t, concurrency, most.Load(), "never more than Concurrency jobs at once")
	assert.Equal(t, 0, count("SELECT count(*) FROM jobs WHERE status = 'job_status_running'"), "nothing left locked")
	assert.Equal(t, concurrency, count("SELECT count(*) FROM jobs WHERE status = 'job_status_retry' AND attempts_count = 0 AND locked_by IS NULL"),
		"the jobs read ahead went back in the queue, their attempt not counted")

	// A later worker runs the rest, each job exactly once.
	done, cancel = run(ctx)
	defer cancel()
	waitFor(t, "every job done", func() bool {
		return count("SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == 200+3*concurrency
	})
	cancel()
	<-done
	assert.Equal(t, 0, count("SELECT count(*) FROM jobs WHERE attempts_count <> 1"), "every job ran exactly once")
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
