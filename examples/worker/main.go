// Command worker is the smallest complete job runner on jobwatch, to copy:
// one loop that waits for a wake-up, fetches due jobs with UPDATE ... FOR
// UPDATE SKIP LOCKED, runs them (at most -concurrency at once), records
// each result, and on Ctrl-C or SIGTERM stops fetching and waits for the
// jobs it started.
//
// It connects with DATABASE_URL, else pgx's defaults (PG* variables, the
// local socket, localhost:5432), and creates the job table if it is
// missing. The demo flags enqueue jobs and exit once none is left:
//
//	go run ./examples/worker -enqueue 20 -enqueue-later 5 -exit-when-idle
//
// internal/runner is the same loop tuned for throughput (batched fetches
// and results, reading ahead, stale-job recovery, retries with backoff).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

func main() {
	table := flag.String("table", "jobs", "job table ([schema.]table)")
	concurrency := flag.Int("concurrency", 4, "jobs run at once")
	enqueue := flag.Int("enqueue", 0, "demo: enqueue this many jobs to run now")
	enqueueLater := flag.Int("enqueue-later", 0, "demo: enqueue this many jobs scheduled 1 to 5 s ahead")
	exitIdle := flag.Bool("exit-when-idle", false, "demo: exit once no job is pending or scheduled")
	flag.Parse()
	if *concurrency < 1 || *enqueue < 0 || *enqueueLater < 0 {
		fmt.Fprintln(os.Stderr, "worker: -concurrency must be 1 or more, -enqueue and -enqueue-later 0 or more")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *table, *concurrency, *enqueue, *enqueueLater, *exitIdle); err != nil {
		slog.Error("worker stopped", "error", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, table string, concurrency, enqueue, enqueueLater int, exitIdle bool) error {
	dsn := os.Getenv("DATABASE_URL")
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	t, err := jobwatch.QuoteTableName(table) // the table name as safe SQL
	if err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, jobwatch.CreateJobTableSQL(table)); err != nil {
		return fmt.Errorf("create job table: %w", err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+t+` (run_at) SELECT now() + CASE WHEN i > $1::int
		THEN make_interval(secs => 1 + random() * 4) ELSE '0' END FROM generate_series(1, $1::int + $2::int) i`,
		enqueue, enqueueLater); err != nil {
		return fmt.Errorf("enqueue: %w", err)
	}

	listener, err := jobwatch.NewListener(dsn) // one per process, shared by every table
	if err != nil {
		return err
	}
	defer listener.Close()
	wake := make(chan jobwatch.Message, concurrency)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, table, time.Minute, wake)
	if err != nil {
		return err
	}
	defer watch.Close()
	slog.Info("worker started", "table", table, "concurrency", concurrency)

	slots := make(chan struct{}, concurrency) // a slot per running job
	var running sync.WaitGroup
	defer running.Wait() // on the way out, let started jobs finish and be recorded
	idle := time.NewTicker(200 * time.Millisecond)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-idle.C:
			if exitIdle && len(slots) == 0 && nothingLeft(ctx, pool, t) {
				slog.Info("no job left: exiting")
				return nil
			}
			continue
		case <-wake:
		}
		// Fetch while jobs are due and a slot is free.
		for ctx.Err() == nil {
			slots <- struct{}{}
			var id string
			// Not ctx: a fetch cut short by Ctrl-C may still have marked
			// a job running on the server, and no one would run it.
			fetchCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			err := pool.QueryRow(fetchCtx, `UPDATE `+t+` SET status = 'job_status_running', locked_at = now(),
					locked_by = gen_random_uuid(), attempts_count = attempts_count + 1, updated_at = now()
				WHERE id = (SELECT id FROM `+t+`
					WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
					ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED)
				RETURNING id::text`).Scan(&id)
			cancel()
			if err != nil {
				<-slots
				if !errors.Is(err, pgx.ErrNoRows) && ctx.Err() == nil {
					slog.Error("fetch failed", "error", err)
				}
				break // nothing due: wait for the next wake-up
			}
			running.Add(1)
			go func() {
				defer running.Done()
				defer func() { <-slots }()
				record(pool, t, id, perform(id))
			}()
		}
	}
}

// perform is the job itself: here, a demo that works for 100 ms.
func perform(id string) error {
	time.Sleep(100 * time.Millisecond)
	slog.Info("job done", "id", id)
	return nil
}

// record marks the job succeeded, or failed with its error. It runs even
// during shutdown, so it does not use the run's context.
func record(pool *pgxpool.Pool, table, id string, jobErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	status, lastError := "job_status_succeeded", ""
	if jobErr != nil {
		status, lastError = "job_status_failed", jobErr.Error()
	}
	// The status is a parameter so that its type is the column's (enum or text).
	if _, err := pool.Exec(ctx, `UPDATE `+table+` SET status = $2, last_error = nullif($3, ''), updated_at = now()
		WHERE id = $1`, id, status, lastError); err != nil {
		slog.Error("record job result", "id", id, "error", err)
	}
}

func nothingLeft(ctx context.Context, pool *pgxpool.Pool, table string) bool {
	var busy bool
	err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+table+`
		WHERE status IN ('job_status_not_started', 'job_status_retry', 'job_status_running'))`).Scan(&busy)
	return err == nil && !busy
}
