// Command worker is a complete small job runner built on jobwatch.
//
// It creates an IHP-shaped job table if it is missing, watches it, fetches
// jobs with UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING, runs them with
// bounded concurrency, marks them succeeded or failed (with retries), puts
// jobs whose worker died back in the queue, and shuts down cleanly on
// Ctrl-C or SIGTERM (a second signal exits at once).
//
// It connects with DATABASE_URL, else pgx's defaults (PG* variables, the
// local socket, localhost:5432).
//
//	go run ./examples/worker -enqueue 20 -enqueue-later 5
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

type config struct {
	table        string
	concurrency  int
	pollInterval time.Duration
	staleAfter   time.Duration
	maxAttempts  int
	jobDuration  time.Duration
	failRate     float64
	enqueue      int
	enqueueLater int
	exitIdle     bool
}

func main() {
	var c config
	flag.StringVar(&c.table, "table", "jobs", "job table ([schema.]table)")
	flag.IntVar(&c.concurrency, "concurrency", 4, "jobs run at once")
	flag.DurationVar(&c.pollInterval, "poll", time.Minute, "poll interval")
	flag.DurationVar(&c.staleAfter, "stale-after", 5*time.Minute, "a running job locked longer than this is put back in the queue (its worker died)")
	flag.IntVar(&c.maxAttempts, "max-attempts", 3, "attempts before a failing job is marked failed")
	flag.DurationVar(&c.jobDuration, "job-duration", 100*time.Millisecond, "how long each demo job works (0 for a no-op job)")
	flag.Float64Var(&c.failRate, "fail-rate", 0.1, "share of demo job runs that fail, 0 to 1")
	flag.IntVar(&c.enqueue, "enqueue", 0, "enqueue this many demo jobs to run now")
	flag.IntVar(&c.enqueueLater, "enqueue-later", 0, "enqueue this many demo jobs scheduled 1 to 5 s ahead")
	flag.BoolVar(&c.exitIdle, "exit-when-idle", false, "exit once no job is pending, scheduled or running")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(c, logger); err != nil {
		logger.Error("worker stopped", "error", err)
		os.Exit(1)
	}
}

func run(c config, logger *slog.Logger) error {
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-signals
		logger.Info("shutting down: finishing running jobs (signal again to exit at once)")
		stop()
		<-signals
		logger.Warn("second signal: exiting now")
		os.Exit(1)
	}()

	dsn := os.Getenv("DATABASE_URL")
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, jobwatch.CreateJobTableSQL(c.table)); err != nil {
		return fmt.Errorf("create job table: %w", err)
	}
	q, err := newQueries(c.table)
	if err != nil {
		return err
	}
	if err := enqueueDemo(ctx, pool, q, c.enqueue, c.enqueueLater); err != nil {
		return err
	}

	listener, err := jobwatch.NewListener(dsn, jobwatch.WithLogger(logger))
	if err != nil {
		return err
	}
	defer listener.Close()
	wake := make(chan jobwatch.Message, c.concurrency)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, c.table, c.pollInterval, wake, jobwatch.WithLogger(logger))
	if err != nil {
		return err
	}
	defer watch.Close()

	var workerID pgtype.UUID
	_, _ = rand.Read(workerID.Bytes[:])
	workerID.Valid = true
	w := &worker{c: c, pool: pool, q: q, id: workerID, log: logger}
	logger.Info("worker started", "table", c.table, "concurrency", c.concurrency, "worker_id", fmt.Sprintf("%x", workerID.Bytes))

	var wg sync.WaitGroup
	for range c.concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.loop(ctx, wake)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.housekeeping(ctx, stop)
	}()
	wg.Wait()
	logger.Info("worker stopped", "ran", w.ran.Load(), "failed", w.failed.Load())
	return nil
}

// queries holds the worker's SQL for one table.
type queries struct {
	fetch, succeed, fail, unlockStale, insertNow, insertLater, busy string
}

func newQueries(table string) (queries, error) {
	ident, err := quoteTable(table)
	if err != nil {
		return queries{}, err
	}
	return queries{
		// The standard fetch: lock one due job, skipping those other workers
		// hold, and mark it running in the same statement.
		fetch: `UPDATE ` + ident + ` SET status = 'job_status_running', locked_at = now(), locked_by = $1,
				attempts_count = attempts_count + 1, updated_at = now()
			WHERE id = (SELECT id FROM ` + ident + `
				WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
				ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED)
			RETURNING id, attempts_count`,
		succeed: `UPDATE ` + ident + ` SET status = 'job_status_succeeded', locked_by = NULL, locked_at = NULL, updated_at = now()
			WHERE id = $1 AND locked_by = $2`,
		// A failed job is retried with a backoff until max attempts. The
		// status is a parameter so that its type is the column's (enum or text).
		fail: `UPDATE ` + ident + ` SET status = $3, last_error = $4, locked_by = NULL, locked_at = NULL, updated_at = now(),
				run_at = now() + make_interval(secs => power(2, attempts_count))
			WHERE id = $1 AND locked_by = $2`,
		// IHP's staleJobTimeout: a job running longer than that lost its
		// worker (killed, crashed); put it back in the queue.
		unlockStale: `UPDATE ` + ident + ` SET status = 'job_status_retry', locked_by = NULL, locked_at = NULL, updated_at = now()
			WHERE status = 'job_status_running' AND locked_at < now() - $1::interval`,
		insertNow:   `INSERT INTO ` + ident + ` SELECT FROM generate_series(1, $1::int)`,
		insertLater: `INSERT INTO ` + ident + ` (run_at) SELECT now() + make_interval(secs => 1 + random() * 4) FROM generate_series(1, $1::int)`,
		busy: `SELECT EXISTS (SELECT 1 FROM ` + ident + `
			WHERE status IN ('job_status_not_started', 'job_status_retry', 'job_status_running'))`,
	}, nil
}

// quoteTable quotes a [schema.]table name with pgx's identifier sanitizing.
func quoteTable(table string) (string, error) {
	var ident pgx.Identifier
	for part := range splitDots(table) {
		ident = append(ident, part)
	}
	if len(ident) == 0 || len(ident) > 2 {
		return "", fmt.Errorf("invalid table name %q: want [schema.]table", table)
	}
	return ident.Sanitize(), nil
}

func splitDots(s string) func(func(string) bool) {
	return func(yield func(string) bool) {
		start := 0
		for i := 0; i <= len(s); i++ {
			if i == len(s) || s[i] == '.' {
				if !yield(s[start:i]) {
					return
				}
				start = i + 1
			}
		}
	}
}

func enqueueDemo(ctx context.Context, pool *pgxpool.Pool, q queries, now, later int) error {
	if now > 0 {
		if _, err := pool.Exec(ctx, q.insertNow, now); err != nil {
			return fmt.Errorf("enqueue: %w", err)
		}
	}
	if later > 0 {
		if _, err := pool.Exec(ctx, q.insertLater, later); err != nil {
			return fmt.Errorf("enqueue: %w", err)
		}
	}
	return nil
}

type worker struct {
	c    config
	pool *pgxpool.Pool
	q    queries
	id   pgtype.UUID
	log  *slog.Logger

	ran, failed atomic.Int64
}

// loop waits for a wake-up, then fetches and runs jobs until none is due.
func (w *worker) loop(ctx context.Context, wake <-chan jobwatch.Message) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		for ctx.Err() == nil {
			ran, err := w.runOne(ctx)
			if err != nil {
				if ctx.Err() == nil {
					w.log.Error("fetch failed", "error", err)
				}
				break
			}
			if !ran {
				break
			}
		}
	}
}

// runOne fetches one due job and runs it; it reports false when none was due.
func (w *worker) runOne(ctx context.Context) (bool, error) {
	var id pgtype.UUID
	var attempts int
	err := w.pool.QueryRow(ctx, w.q.fetch, w.id).Scan(&id, &attempts)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	// The job runs to the end even when shutdown starts: a graceful stop
	// finishes the jobs it took.
	jobErr := w.perform(attempts)
	done := context.WithoutCancel(ctx)
	if jobErr != nil {
		w.failed.Add(1)
		w.log.Info("job failed", "id", fmt.Sprintf("%x", id.Bytes), "attempt", attempts, "error", jobErr)
		status := "job_status_retry"
		if attempts >= w.c.maxAttempts {
			status = "job_status_failed"
		}
		_, err = w.pool.Exec(done, w.q.fail, id, w.id, status, jobErr.Error())
	} else {
		w.ran.Add(1)
		w.log.Debug("job done", "id", fmt.Sprintf("%x", id.Bytes))
		_, err = w.pool.Exec(done, w.q.succeed, id, w.id)
	}
	return true, err
}

// perform is the demo job: it works for jobDuration and fails at failRate.
func (w *worker) perform(attempt int) error {
	if w.c.jobDuration > 0 {
		time.Sleep(w.c.jobDuration)
	}
	if w.c.failRate > 0 && mrand.Float64() < w.c.failRate {
		return fmt.Errorf("demo failure on attempt %d", attempt)
	}
	return nil
}

// housekeeping puts stale jobs back in the queue and, with -exit-when-idle,
// stops the worker once there is nothing left to do.
func (w *worker) housekeeping(ctx context.Context, stop context.CancelFunc) {
	stale := fmt.Sprintf("%d milliseconds", w.c.staleAfter.Milliseconds())
	tick := time.NewTicker(min(w.c.staleAfter/2, time.Minute))
	defer tick.Stop()
	idle := time.NewTicker(100 * time.Millisecond)
	defer idle.Stop()
	if !w.c.exitIdle {
		idle.Stop()
	}
	for {
		if tag, err := w.pool.Exec(ctx, w.q.unlockStale, stale); err == nil && tag.RowsAffected() > 0 {
			w.log.Warn("put stale jobs back in the queue", "count", tag.RowsAffected())
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-idle.C:
			var busy bool
			if err := w.pool.QueryRow(ctx, w.q.busy).Scan(&busy); err == nil && !busy {
				w.log.Info("no job left: exiting")
				stop()
				return
			}
		}
	}
}
