// Command runner is jobwatch's tuned job runner: the subject of the
// multi-process tests and of the benchmark. It does what examples/worker
// does, and more: two fetchers keep a fetch in flight while the other's
// jobs start, finished jobs are recorded in batches, jobs whose worker died
// are put back in the queue (-stale-after), failing jobs are retried with a
// backoff, and -exit-when-idle ends it when nothing is left. Start from
// examples/worker for your own runner; come here for these refinements.
//
// It connects with DATABASE_URL, else pgx's defaults (PG* variables, the
// local socket, localhost:5432).
//
//	go run ./internal/runner -enqueue 20 -enqueue-later 5 -exit-when-idle
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
	syncCommit   string
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
	flag.StringVar(&c.syncCommit, "synchronous-commit", "on", "synchronous_commit for the worker's own bookkeeping (fetch, mark done); off trades a re-run of the last jobs after a server crash for fewer disk flushes")
	flag.BoolVar(&c.exitIdle, "exit-when-idle", false, "exit once no job is pending, scheduled or running")
	flag.Parse()
	if err := c.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "runner:", err)
		flag.Usage()
		os.Exit(2)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(c, logger); err != nil {
		logger.Error("worker stopped", "error", err)
		os.Exit(1)
	}
}

// validate rejects flag values the runner cannot work with.
func (c config) validate() error {
	switch {
	case c.concurrency < 1:
		return fmt.Errorf("-concurrency %d: want 1 or more", c.concurrency)
	case c.pollInterval <= 0:
		return fmt.Errorf("-poll %v: want a positive duration", c.pollInterval)
	case c.staleAfter <= 0:
		return fmt.Errorf("-stale-after %v: want a positive duration", c.staleAfter)
	case c.maxAttempts < 1:
		return fmt.Errorf("-max-attempts %d: want 1 or more", c.maxAttempts)
	case c.jobDuration < 0:
		return fmt.Errorf("-job-duration %v: want 0 or more", c.jobDuration)
	case c.failRate < 0 || c.failRate > 1:
		return fmt.Errorf("-fail-rate %v: want 0 to 1", c.failRate)
	case c.enqueue < 0 || c.enqueueLater < 0:
		return errors.New("-enqueue and -enqueue-later: want 0 or more")
	case c.syncCommit != "on" && c.syncCommit != "off" && c.syncCommit != "local" &&
		c.syncCommit != "remote_write" && c.syncCommit != "remote_apply":
		return fmt.Errorf("-synchronous-commit %q: want on, off, local, remote_write or remote_apply", c.syncCommit)
	}
	return nil
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
	poolConfig, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return fmt.Errorf("parse DATABASE_URL: %w", err)
	}
	poolConfig.ConnConfig.RuntimeParams["synchronous_commit"] = c.syncCommit
	pool, err := pgxpool.NewWithConfig(ctx, poolConfig)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	if err := createTable(ctx, pool, c.table); err != nil {
		return err
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
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.fetchLoop(ctx, wake)
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.housekeeping(ctx, stop)
	}()
	wg.Wait()
	logger.Info("worker stopped", "ran", w.ran.Load(), "failed", w.failed.Load(), "fetches", w.fetches.Load())
	return nil
}

// createTable creates the job table if it is missing. Workers started
// together would race on CREATE TYPE / CREATE TABLE IF NOT EXISTS (which can
// fail with a duplicate key), so creation runs under an advisory lock.
func createTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('jobwatch runner: create job table'))"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, jobwatch.CreateJobTableSQL(table))
		return err
	})
	if err != nil {
		return fmt.Errorf("create job table: %w", err)
	}
	return nil
}

// queries holds the worker's SQL for one table.
type queries struct {
	fetch, succeed, fail, unlockStale, insertNow, insertLater, busy string
}

func newQueries(table string) (queries, error) {
	ident, err := jobwatch.QuoteTableName(table)
	if err != nil {
		return queries{}, err
	}
	return queries{
		// The standard fetch: lock up to $2 due jobs, skipping those other
		// workers hold, and mark them running in the same statement.
		fetch: `UPDATE ` + ident + ` SET status = 'job_status_running', locked_at = now(), locked_by = $1,
				attempts_count = attempts_count + 1, updated_at = now()
			WHERE id IN (SELECT id FROM ` + ident + `
				WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
				ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED)
			RETURNING id, attempts_count`,
		// As IHP does, a finished job keeps locked_at and locked_by: they
		// say when and by whom it was run.
		succeed: `UPDATE ` + ident + ` SET status = 'job_status_succeeded', updated_at = now()
			WHERE id = ANY($1) AND locked_by = $2`,
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

	ran, failed, fetches atomic.Int64
}

// fetchLoop runs the fetchers and the completer. Each fetcher waits for a
// wake-up, then fetches due jobs, as many at a time as there are free
// slots, and starts them, until none is due. One statement (UPDATE ... FOR
// UPDATE SKIP LOCKED ... RETURNING) locks a batch; two fetchers keep a
// round trip in flight while the other's jobs start; a completer marks
// finished jobs in batches. A burst thus costs a few round trips per batch
// instead of two commits per job. On shutdown fetching stops and the loop
// waits for the jobs it started and their recording.
func (w *worker) fetchLoop(ctx context.Context, wake <-chan jobwatch.Message) {
	slots := make(chan struct{}, w.c.concurrency)
	// Results wait here for the completer; a job's slot is free as soon
	// as the job returns.
	results := make(chan result, 64*w.c.concurrency)
	completerDone := make(chan struct{})
	go func() {
		defer close(completerDone)
		w.complete(results)
	}()
	var running, fetchers sync.WaitGroup
	for range min(2, w.c.concurrency) {
		fetchers.Add(1)
		go func() {
			defer fetchers.Done()
			w.fetcher(ctx, wake, slots, results, &running)
		}()
	}
	fetchers.Wait()
	running.Wait()
	close(results)
	<-completerDone
}

func (w *worker) fetcher(ctx context.Context, wake <-chan jobwatch.Message, slots chan struct{},
	results chan<- result, running *sync.WaitGroup) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		for ctx.Err() == nil {
			// Take every free slot, waiting for at least one.
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			free := 1
		take:
			for free < w.c.concurrency {
				select {
				case slots <- struct{}{}:
					free++
				default:
					break take
				}
			}
			jobs, err := w.fetch(ctx, free)
			if err != nil && ctx.Err() == nil {
				w.log.Error("fetch failed", "error", err)
			}
			for range free - len(jobs) {
				<-slots
			}
			for _, j := range jobs {
				running.Add(1)
				go func() {
					defer running.Done()
					r := result{job: j, err: w.perform(j.attempts)}
					<-slots
					results <- r
				}()
			}
			if len(jobs) < free {
				break // nothing more is due; wait for the next wake-up
			}
		}
	}
}

type job struct {
	id       pgtype.UUID
	attempts int
}

type result struct {
	job job
	err error
}

// fetch locks up to n due jobs for this worker.
func (w *worker) fetch(ctx context.Context, n int) ([]job, error) {
	w.fetches.Add(1)
	rows, err := w.pool.Query(ctx, w.q.fetch, w.id, n)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (job, error) {
		var j job
		err := r.Scan(&j.id, &j.attempts)
		return j, err
	})
}

// complete records results: every success that is waiting goes in one
// UPDATE, each failure in its own. It runs to the end even during
// shutdown: a graceful stop records the jobs it ran.
func (w *worker) complete(results <-chan result) {
	ctx := context.Background()
	var ok []pgtype.UUID
	for r := range results {
		ok = ok[:0]
		for {
			if r.err == nil {
				ok = append(ok, r.job.id)
			} else {
				w.recordFailure(ctx, r)
			}
			var more bool
			select {
			case r, more = <-results:
			default:
			}
			if !more {
				break
			}
		}
		if len(ok) > 0 {
			if _, err := w.pool.Exec(ctx, w.q.succeed, ok, w.id); err != nil {
				w.log.Error("mark jobs succeeded", "error", err)
			}
			w.ran.Add(int64(len(ok)))
		}
	}
}

func (w *worker) recordFailure(ctx context.Context, r result) {
	w.failed.Add(1)
	w.log.Info("job failed", "id", fmt.Sprintf("%x", r.job.id.Bytes), "attempt", r.job.attempts, "error", r.err)
	status := "job_status_retry"
	if r.job.attempts >= w.c.maxAttempts {
		status = "job_status_failed"
	}
	if _, err := w.pool.Exec(ctx, w.q.fail, r.job.id, w.id, status, r.err.Error()); err != nil {
		w.log.Error("mark job failed", "error", err)
	}
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
