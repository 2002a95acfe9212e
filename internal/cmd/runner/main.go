// Command runner runs internal/runner, jobwatch's tuned job runner, as a
// process: the subject of the multi-process tests. Its demo job works for
// -job-duration and fails at -fail-rate.
//
// It connects with DATABASE_URL, else pgx's defaults (PG* variables, the
// local socket, localhost:5432).
//
//	go run ./internal/cmd/runner -enqueue 20 -enqueue-later 5 -exit-when-idle
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/runner"
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
	gate         bool
	listenOnly   bool
	fleet        bool
}

func main() {
	var c config
	flag.StringVar(&c.table, "table", "jobs", "job table ([schema.]table), or several separated by commas, each with its own runner")
	flag.BoolVar(&c.gate, "gate", true, "install and follow the notify gate")
	flag.IntVar(&c.concurrency, "concurrency", 4, "jobs run at once")
	flag.DurationVar(&c.pollInterval, "poll", time.Minute, "poll interval")
	flag.DurationVar(&c.staleAfter, "stale-after", 5*time.Minute, "a running job locked longer than this is put back in the queue (its worker died)")
	flag.IntVar(&c.maxAttempts, "max-attempts", 3, "attempts before a failing job is marked failed")
	flag.DurationVar(&c.jobDuration, "job-duration", 100*time.Millisecond, "how long each demo job works (0 for a no-op job)")
	flag.Float64Var(&c.failRate, "fail-rate", 0.1, "share of demo job runs that fail, 0 to 1")
	flag.IntVar(&c.enqueue, "enqueue", 0, "enqueue this many demo jobs to run now")
	flag.IntVar(&c.enqueueLater, "enqueue-later", 0, "enqueue this many demo jobs scheduled 1 to 5 s ahead")
	flag.StringVar(&c.syncCommit, "synchronous-commit", "on", "synchronous_commit for the worker's own bookkeeping (fetch, mark done); off trades a re-run of the last jobs after a server crash for fewer disk flushes")
	flag.BoolVar(&c.listenOnly, "listen-only", false, "watch the tables and take the wake-ups, but never fetch a job (the fleet benchmark's herd-free control)")
	flag.BoolVar(&c.fleet, "fleet", false, "share the tables' wake-ups with the other processes that watch them with -fleet (jobwatch.WithFleet): one process woken per job")
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
	tables := strings.Split(c.table, ",")
	for _, t := range tables {
		if err := runner.CreateTable(ctx, pool, t); err != nil {
			return err
		}
		if err := runner.Enqueue(ctx, pool, t, c.enqueue, c.enqueueLater); err != nil {
			return err
		}
	}
	listener, err := jobwatch.NewListener(dsn, jobwatch.WithLogger(logger))
	if err != nil {
		return err
	}
	defer listener.Close()
	live := make([]*runner.Live, len(tables))
	go printStats(listener, live)
	var wg sync.WaitGroup
	errs := make([]error, len(tables))
	for i, t := range tables {
		live[i] = &runner.Live{}
		if c.listenOnly {
			wg.Go(func() { errs[i] = listen(ctx, pool, listener, t, c, logger, live[i]) })
			continue
		}
		wg.Go(func() {
			counts, err := runner.Run(ctx, pool, listener, runner.Config{
				Table: t, Concurrency: c.concurrency, PollInterval: c.pollInterval, StaleAfter: c.staleAfter,
				MaxAttempts: c.maxAttempts, ExitWhenIdle: c.exitIdle, Logger: logger, Live: live[i], Fleet: c.fleet,
				Options: []jobwatch.Option{jobwatch.WithNotifyGate(c.gate)},
				Perform: func(_ context.Context, attempt int) error { return c.perform(attempt) },
			})
			if err == nil {
				logger.Info("worker stopped", "table", t, "ran", counts.Ran, "failed", counts.Failed, "fetches", counts.Fetches)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// listen watches table and takes its wake-ups without ever fetching, until
// ctx ends: a process of the fleet that costs what listening costs.
func listen(ctx context.Context, pool *pgxpool.Pool, listener *jobwatch.Listener, table string, c config, logger *slog.Logger, live *runner.Live) error {
	wake := make(chan jobwatch.Message, c.concurrency)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, table, c.pollInterval, wake,
		jobwatch.WithLogger(logger), jobwatch.WithNotifyGate(c.gate))
	if err != nil {
		return err
	}
	defer watch.Close()
	live.SetWatch(watch)
	logger.Info("worker started", "table", table, "listen_only", true)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		}
	}
}

// printStats prints, on SIGUSR1, one JSON line on stdout with what the
// process has done so far: for the fleet benchmark.
func printStats(listener *jobwatch.Listener, live []*runner.Live) {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	for range usr1 {
		var s struct {
			ListenerQueries, WatchQueries, Notifications, Polls, Fetches, Ran, Rescues uint64
		}
		s.ListenerQueries = listener.Stats().Queries
		for _, l := range live {
			if w := l.Watch(); w != nil {
				ws := w.Stats()
				s.WatchQueries += ws.Queries
				s.Notifications += ws.Notifications
				s.Polls += ws.Polls
				s.Rescues += ws.Wakeups.Rescue
			}
			s.Fetches += uint64(l.Fetches.Load())
			s.Ran += uint64(l.Ran.Load())
		}
		line, _ := json.Marshal(s)
		fmt.Println(string(line))
	}
}

// perform is the demo job: it works for jobDuration and fails at failRate.
func (c config) perform(attempt int) error {
	if c.jobDuration > 0 {
		time.Sleep(c.jobDuration)
	}
	if c.failRate > 0 && mrand.Float64() < c.failRate {
		return fmt.Errorf("demo failure on attempt %d", attempt)
	}
	return nil
}
