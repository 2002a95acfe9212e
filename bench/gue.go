package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jobwatch-go/jobwatch"
	"github.com/vgarvardt/gue/v5"
	"github.com/vgarvardt/gue/v5/adapter/pgxv5"
)

// gueSchemaSQL is gue's migrations/schema.sql (v5.8.0), verbatim.
const gueSchemaSQL = `CREATE TABLE IF NOT EXISTS gue_jobs
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

// guePoll is gue's default poll interval.
const guePoll = 5 * time.Second

// gueLatency: gue v5.8.0 on its own table, from Client.Enqueue's call to
// the handler's start, on the client's clock, one job at a time, each
// enqueued 50 to 300 ms (at random) after the previous one's handler
// started. A gue Worker woken by jobwatch (a watch of gue_jobs described
// by gueTable, WithQueues; each wake-up runs WorkOne until it finds no
// job) next to a gue WorkerPool alone with its defaults (4 workers, poll
// every 5 s, in step). Both run throughout, each on a queue of its own,
// and their jobs are interleaved; each job of gue alone waits a further
// random 0 to 5 s, so that it falls at random in gue's poll interval.
func (b *bench) gueLatency() error {
	for _, sql := range []string{gueSchemaSQL, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", gueTable)} {
		if err := b.exec(sql); err != nil {
			return err
		}
	}
	client, err := gue.NewClient(pgxv5.NewConnPool(b.pool))
	if err != nil {
		return err
	}
	started := make(chan time.Time, 16)
	wm := gue.WorkMap{"bench": func(context.Context, *gue.Job) error { started <- time.Now(); return nil }}
	alone, err := gue.NewWorkerPool(client, wm, 4, gue.WithPoolQueue("alone"))
	if err != nil {
		return err
	}
	woken, err := gue.NewWorker(client, wm, gue.WithWorkerQueue("woken"))
	if err != nil {
		return err
	}
	l, err := jobwatch.NewListener(b.url, b.quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 1)
	// WithClockSkew as examples/gue has it: gue compares run_at with its
	// own clock.
	w, err := b.watch(l, "gue_jobs", wake, jobwatch.WithJobTable(gueTable), jobwatch.WithQueues("woken"), jobwatch.WithClockSkew(time.Second))
	if err != nil {
		return err
	}
	defer w.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	wg.Go(func() { _ = alone.Run(ctx) })
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			for ctx.Err() == nil && woken.WorkOne(ctx) {
			}
		}
	})

	nWoken, nAlone := samples(200, 50), samples(12, 4)
	var order []string // one job alone, then its share of the woken ones
	for i := range nAlone {
		order = append(order, "alone")
		for range nWoken*(i+1)/nAlone - nWoken*i/nAlone {
			order = append(order, "woken")
		}
	}
	lat := map[string][]time.Duration{}
	var enq []time.Duration // the Enqueue calls themselves (the INSERT and its commit)
	for _, q := range order {
		gap := 50*time.Millisecond + rand.N(250*time.Millisecond)
		if q == "alone" {
			gap += rand.N(guePoll)
		}
		time.Sleep(gap)
		t0 := time.Now()
		if err := client.Enqueue(ctx, &gue.Job{Type: "bench", Queue: q}); err != nil {
			return err
		}
		if q == "woken" {
			enq = append(enq, time.Since(t0))
		}
		select {
		case at := <-started:
			lat[q] = append(lat[q], at.Sub(t0))
		case <-time.After(30 * time.Second):
			return fmt.Errorf("a job of queue %q did not start within 30 s", q)
		}
	}
	p := func(d []time.Duration) string {
		return ms(percentile(d, 50)) + " / " + ms(percentile(d, 99)) + " / " + ms(percentile(d, 100))
	}
	s := w.Stats()
	b.report(row{fmt.Sprintf("gue woken by jobwatch, enqueue to handler start p50 / p99 / max (%d jobs one at a time, 50-300 ms apart; %d notifications, %d polls; the Enqueue call itself: %s)",
		nWoken, s.Notifications, s.Polls, p(enq)),
		p(lat["woken"]), p(lat["alone"]) + fmt.Sprintf(" (gue alone (5 s poll), 4 workers, %d jobs)", nAlone),
		ratio(float64(percentile(lat["woken"], 50)), float64(percentile(lat["alone"], 50))), ""})
	return nil
}
