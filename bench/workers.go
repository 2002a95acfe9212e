package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/runner"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

// The two systems under test, each run in this process with 10 workers,
// its sessions' synchronous_commit as given, calling started as each job's
// handler starts.

const concurrency = 10

// start is one job's handler starting: which job (jobwatch: its id; River:
// its args' Seq, in the id's last bytes), when (this process's clock).
type start struct {
	id [16]byte
	at time.Time
}

// jobwatchWorker runs internal/runner (jobwatch's tuned runner) on table.
// It returns once the runner watches the table.
func (b *bench) jobwatchWorker(table, syncCommit string, started func(start)) (stop func() error, err error) {
	pool, err := newPool(b.ctx, b.url, syncCommit, concurrency+4)
	if err != nil {
		return nil, err
	}
	l, err := jobwatch.NewListener(b.url, b.quiet)
	if err != nil {
		pool.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(b.ctx)
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := runner.Run(ctx, pool, l, runner.Config{
			Table: table, Concurrency: concurrency, PollInterval: time.Minute, StaleAfter: time.Hour, MaxAttempts: 1,
			Logger:  b.log,
			Perform: func(context.Context, int) error { return nil },
			Started: func(id pgtype.UUID) { started(start{id: id.Bytes, at: time.Now()}) },
			Ready:   func() { close(ready) },
		})
		done <- err
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		l.Close()
		pool.Close()
		return nil, err
	}
	return func() error {
		cancel()
		err := <-done
		l.Close()
		pool.Close()
		return err
	}, nil
}

// seqKey is the key River's job with seq n has in start.
func seqKey(n int64) [16]byte {
	var k [16]byte
	for i := 15; i >= 8; i-- {
		k[i] = byte(n)
		n >>= 8
	}
	return k
}

type benchArgs struct {
	Seq int64 `json:"seq"`
}

func (benchArgs) Kind() string { return "jobwatch_bench" }

type benchWorker struct {
	river.WorkerDefaults[benchArgs]
	started func(start)
}

func (w *benchWorker) Work(_ context.Context, job *river.Job[benchArgs]) error {
	w.started(start{id: seqKey(job.Args.Seq), at: time.Now()})
	return nil
}

type pgxTx = pgx.Tx

// riverConfigs are River's default configuration and its fastest.
var riverConfigs = []struct {
	name     string
	cooldown time.Duration
}{{"River, defaults", 0}, {"River, FetchCooldown 1 ms", time.Millisecond}}

// riverWorker starts a River client (migrating River's schema first) with
// 10 workers and the given FetchCooldown (0: River's default).
func (b *bench) riverWorker(syncCommit string, cooldown time.Duration, started func(start)) (*river.Client[pgxTx], func() error, error) {
	pool, err := newPool(b.ctx, b.url, syncCommit, concurrency+4)
	if err != nil {
		return nil, nil, err
	}
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	if _, err := migrator.Migrate(b.ctx, rivermigrate.DirectionUp, nil); err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("migrate River's schema: %w", err)
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, &benchWorker{started: started})
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		Queues:        map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: concurrency}},
		Workers:       workers,
		FetchCooldown: cooldown,
		Logger:        b.log,
	})
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	if err := client.Start(b.ctx); err != nil {
		pool.Close()
		return nil, nil, err
	}
	return client, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := client.Stop(ctx)
		pool.Close()
		return err
	}, nil
}
