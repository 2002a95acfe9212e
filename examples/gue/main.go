// Command gue runs a gue v5 worker (github.com/vgarvardt/gue) that
// jobwatch wakes through LISTEN/NOTIFY, instead of gue's own poll every
// 5 s: a job enqueued with gue's Client.Enqueue starts at once, a job
// enqueued for later (Job.RunAt) and a retry after an error (gue's backoff
// sets run_at) start when they fall due. gue itself is unchanged: its
// table, its client and its worker's WorkOne.
//
// The loop is work, below: jobwatch watches gue_jobs, described as a
// JobTable (every row waits, since gue deletes finished jobs; due at
// run_at; routed by queue), and each wake-up runs WorkOne until it finds
// no job, at most -concurrency at once.
//
// It connects with DATABASE_URL, else pgx's defaults (PG* variables, the
// local socket, localhost:5432), and creates gue's table if it is missing.
// The demo flags enqueue jobs and exit once none is left:
//
//	go run . -enqueue 20 -enqueue-later 5 -exit-when-idle
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/vgarvardt/gue/v5"
	"github.com/vgarvardt/gue/v5/adapter/pgxv5"
	"golang.org/x/sync/errgroup"
)

// schemaSQL is gue's migrations/schema.sql (v5.8.0).
const schemaSQL = `CREATE TABLE IF NOT EXISTS gue_jobs
(
  job_id      TEXT        NOT NULL PRIMARY KEY,
  priority    SMALLINT    NOT NULL,
  run_at      TIMESTAMPTZ NOT NULL,
  job_type    TEXT        NOT NULL,
  args        BYTEA       NOT NULL,
  error_count INTEGER     NOT NULL DEFAULT 0,
  last_error  TEXT,
  queue       TEXT        NOT NULL,
  created_at  TIMESTAMPTZ NOT NULL,
  updated_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_gue_jobs_selector ON gue_jobs (queue, run_at, priority);`

func main() {
	queue := flag.String("queue", "", "gue queue to work (gue's default queue is \"\")")
	concurrency := flag.Int("concurrency", 4, "jobs run at once")
	enqueue := flag.Int("enqueue", 0, "demo: enqueue this many jobs to run now")
	enqueueLater := flag.Int("enqueue-later", 0, "demo: enqueue this many jobs to run 1 to 5 s ahead")
	exitIdle := flag.Bool("exit-when-idle", false, "demo: exit once the queue has no job left")
	flag.Parse()
	if *concurrency < 1 || *enqueue < 0 || *enqueueLater < 0 {
		fmt.Fprintln(os.Stderr, "gue: -concurrency must be 1 or more, -enqueue and -enqueue-later 0 or more")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *queue, *concurrency, *enqueue, *enqueueLater, *exitIdle); err != nil {
		slog.Error("worker stopped", "error", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, queue string, concurrency, enqueue, enqueueLater int, exitIdle bool) error {
	dsn := os.Getenv("DATABASE_URL")
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, schemaSQL); err != nil {
		return fmt.Errorf("create gue_jobs: %w", err)
	}
	client, err := gue.NewClient(pgxv5.NewConnPool(pool))
	if err != nil {
		return err
	}
	worker, err := gue.NewWorker(client, gue.WorkMap{"demo": demo}, gue.WithWorkerQueue(queue))
	if err != nil {
		return err
	}
	if err := enqueueDemo(ctx, client, queue, enqueue, enqueueLater); err != nil {
		return err
	}
	if exitIdle {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go cancelWhenIdle(ctx, cancel, pool, queue)
	}

	listener, err := jobwatch.NewListener(dsn) // one per process, shared by every watch
	if err != nil {
		return err
	}
	defer listener.Close()
	return work(ctx, pool, listener, worker, queue, concurrency, time.Minute, func(w *jobwatch.Watch) {
		slog.Info("worker started", "table", w.Table(), "queue", queue, "concurrency", concurrency)
	})
}

// work runs gue's worker whenever jobwatch says a job of queue may be due,
// instead of gue's 5 s poll: each wake-up starts WorkOne in a free slot,
// again until it finds no job, at most concurrency at once. started gets
// the running watch. When ctx ends, work waits for the jobs it started.
func work(ctx context.Context, pool *pgxpool.Pool, listener *jobwatch.Listener, worker *gue.Worker,
	queue string, concurrency int, pollInterval time.Duration, started func(*jobwatch.Watch)) error {
	wake := make(chan jobwatch.Message, concurrency)
	var busy atomic.Int64 // slots in use
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, "gue_jobs", pollInterval, wake,
		jobwatch.WithJobTable(jobwatch.JobTable{RunAt: "run_at", Queue: "queue"}),
		jobwatch.WithQueues(queue), jobwatch.WithClockSkew(time.Second),
		// Several processes share the wake-ups: one woken per job.
		jobwatch.WithFleet(func() int { return concurrency - int(busy.Load()) }))
	if err != nil {
		return err
	}
	defer watch.Close()
	started(watch)
	var running errgroup.Group
	running.SetLimit(concurrency) // Go waits for a free slot
	defer running.Wait()          // on the way out, let started jobs finish
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		}
		busy.Add(1)
		running.Go(func() error {
			defer busy.Add(-1)
			// Not ctx: a job cut short by Ctrl-C would roll back and run again.
			for ctx.Err() == nil && worker.WorkOne(context.WithoutCancel(ctx)) {
			}
			return nil
		})
	}
}

// demo is the job itself: here, 100 ms of work.
func demo(ctx context.Context, j *gue.Job) error {
	time.Sleep(100 * time.Millisecond)
	slog.Info("job done", "id", j.ID.String(), "queue", j.Queue)
	return nil
}

func enqueueDemo(ctx context.Context, client *gue.Client, queue string, now, later int) error {
	var jobs []*gue.Job
	for i := range now + later {
		j := &gue.Job{Type: "demo", Queue: queue}
		if i >= now {
			j.RunAt = time.Now().Add(time.Second + rand.N(4*time.Second))
		}
		jobs = append(jobs, j)
	}
	if err := client.EnqueueBatch(ctx, jobs); err != nil {
		return fmt.Errorf("enqueue: %w", err)
	}
	return nil
}

// cancelWhenIdle cancels once queue has no job left, running or not.
func cancelWhenIdle(ctx context.Context, cancel context.CancelFunc, pool *pgxpool.Pool, queue string) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var left bool
		err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM gue_jobs WHERE queue = $1)`, queue).Scan(&left)
		if err == nil && !left {
			slog.Info("no job left: exiting")
			cancel()
			return
		}
	}
}
