package main

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/riverqueue/river"
)

// burst: 10,000 jobs inserted in one call, until every handler started,
// jobwatch (its tuned runner) next to River, worker synchronous_commit on
// and off.
func (b *bench) burst() error {
	n := samples(10000, 2000)
	for _, syncCommit := range []string{"on", "off"} {
		table := "burst_" + syncCommit
		if err := b.jobTable(table); err != nil {
			return err
		}
		jw, err := b.timeAllStarted(n, func(started func(start)) (func() error, error) {
			return b.jobwatchWorker(table, syncCommit, started)
		}, func() error {
			return b.exec(fmt.Sprintf("INSERT INTO %s SELECT FROM generate_series(1, %d)", table, n))
		})
		if err != nil {
			return err
		}
		goal := ""
		if syncCommit == "on" {
			goal = "at least 2x River's fastest"
		}
		for _, rc := range riverConfigs {
			m := n
			if rc.cooldown == 0 {
				m = samples(2000, 500) // River's defaults: about 100 jobs/s
			}
			var client *river.Client[pgxTx]
			rv, err := b.timeAllStarted(m, func(started func(start)) (func() error, error) {
				c, stop, err := b.riverWorker(syncCommit, rc.cooldown, started)
				client = c
				return stop, err
			}, func() error {
				params := make([]river.InsertManyParams, m)
				for i := range params {
					params[i] = river.InsertManyParams{Args: benchArgs{Seq: int64(i)}}
				}
				_, err := client.InsertMany(b.ctx, params)
				return err
			})
			if err != nil {
				return err
			}
			b.report(row{fmt.Sprintf("burst: %d jobs in one call until all started, worker synchronous_commit %s; %s: %d jobs", n, syncCommit, rc.name, m),
				fmt.Sprintf("%.0f jobs/s", jw), fmt.Sprintf("%.0f jobs/s (%s)", rv, rc.name), ratio(jw, rv), goal})
			goal = ""
		}
	}
	return nil
}

// timeAllStarted starts a worker, runs insert, and returns how many jobs a
// second started until n had.
func (b *bench) timeAllStarted(n int, worker func(func(start)) (func() error, error), insert func() error) (float64, error) {
	var count atomic.Int64
	all := make(chan struct{})
	stop, err := worker(func(start) {
		if count.Add(1) == int64(n) {
			close(all)
		}
	})
	if err != nil {
		return 0, err
	}
	defer stop()
	t0 := time.Now()
	if err := insert(); err != nil {
		return 0, err
	}
	select {
	case <-all:
	case <-time.After(5 * time.Minute):
		return 0, fmt.Errorf("%d of %d jobs started within 5 minutes", count.Load(), n)
	}
	return perSecond(n, time.Since(t0)), nil
}
