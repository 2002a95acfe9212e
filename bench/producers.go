package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

const producerConns = 16

// warmUp is how long the producers insert before a latency is measured.
const warmUp = 500 * time.Millisecond

// producers: 16 connections, each inserting one job per transaction with
// synchronous_commit on: without a trigger, with jobwatch's default
// triggers (the notify gate) and with the gate off, interleaved, the median
// of the runs. Then, with the default triggers and a worker running, how
// long after its commit each job's handler starts.
func (b *bench) producers() error {
	dur := time.Duration(samples(10, 3)) * time.Second
	runs := samples(3, 1)
	if err := b.exec(jobwatch.CreateJobTableSQL("prod_none")); err != nil {
		return err
	}
	if err := b.jobTable("prod_gate"); err != nil {
		return err
	}
	if err := b.exec(jobwatch.CreateJobTableSQL("prod_plain")); err != nil {
		return err
	}
	if err := b.exec(jobwatch.CreateNotificationTriggerSQLWith("prod_plain", jobwatch.WithNotifyGate(false))); err != nil {
		return err
	}
	pool, err := newPool(b.ctx, b.url, "on", producerConns)
	if err != nil {
		return err
	}
	defer pool.Close()
	tables := []string{"prod_none", "prod_gate", "prod_plain"}
	rates := map[string][]float64{}
	for range runs {
		for _, t := range tables {
			if err := b.exec("TRUNCATE " + t); err != nil {
				return err
			}
			_, _ = b.pool.Exec(b.ctx, "CHECKPOINT")
			n, err := insertFor(b.ctx, pool, t, dur, nil)
			if err != nil {
				return err
			}
			rates[t] = append(rates[t], perSecond(n, dur))
		}
	}
	median := func(t string) float64 {
		r := slices.Clone(rates[t])
		slices.Sort(r)
		return r[len(r)/2]
	}
	none := median("prod_none")
	b.report(row{fmt.Sprintf("%d producers, one job per transaction (synchronous_commit on), median of %d", producerConns, runs),
		fmt.Sprintf("%.0f inserts/s", median("prod_gate")), fmt.Sprintf("%.0f inserts/s (no trigger)", none),
		ratio(median("prod_gate"), none), "at least 0.85x"})
	b.report(row{"same, the gate off (every transaction notifies; reference)",
		fmt.Sprintf("%.0f inserts/s", median("prod_plain")), fmt.Sprintf("%.0f inserts/s (no trigger)", none),
		ratio(median("prod_plain"), none), ""})
	return b.wakeUnderLoad(pool, dur)
}

// floorUnderLoad: the bare LISTEN floor, one INSERT at a time, while the
// producers insert into table, one without a trigger: what a notification
// costs on this machine under that load, whoever sends it.
func (b *bench) floorUnderLoad(pool *pgxpool.Pool, table string, dur time.Duration) ([]time.Duration, error) {
	f, err := b.newFloor()
	if err != nil {
		return nil, err
	}
	defer f.stop()
	conn, err := b.pool.Acquire(b.ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Release()
	var lat []time.Duration
	var probeErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		deadline := time.Now().Add(dur)
		for time.Now().Before(deadline) {
			d, err := f.once(b.ctx, conn)
			if err != nil {
				probeErr = err
				return
			}
			lat = append(lat, d)
		}
	}()
	_, err = insertFor(b.ctx, pool, table, dur, nil)
	<-done
	if err == nil {
		err = probeErr
	}
	return lat, err
}

// wakeUnderLoad: the producers again, on a watched table; a consumer that
// fetches every due job in one statement on each wake-up (so that its
// capacity is not what is measured) notes when each job was fetched. For
// each job, its commit (the INSERT's return) to its fetch.
func (b *bench) wakeUnderLoad(pool *pgxpool.Pool, dur time.Duration) error {
	if err := b.jobTable("prod_wake"); err != nil {
		return err
	}
	l, err := jobwatch.NewListener(b.url, b.quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 1)
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	w, err := jobwatch.WatchForJob(ctx, b.pool, l, "prod_wake", time.Minute, wake, b.quiet)
	if err != nil {
		return err
	}
	defer w.Close()
	var mu sync.Mutex
	fetched := map[[16]byte]time.Time{}
	consumerDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-ctx.Done():
				consumerDone <- nil
				return
			case <-wake:
			}
			// The pending condition as the partial index has it, so that
			// the fetch reads the index, not the whole table.
			rows, err := b.pool.Query(ctx, `UPDATE prod_wake SET status = 'job_status_succeeded'
				WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
				RETURNING id`)
			if err != nil {
				consumerDone <- err
				return
			}
			now := time.Now()
			var id pgtype.UUID
			_, err = pgx.ForEachRow(rows, []any{&id}, func() error {
				mu.Lock()
				fetched[id.Bytes] = now
				mu.Unlock()
				return nil
			})
			if err != nil {
				consumerDone <- err
				return
			}
		}
	}()
	// Warm up first: each producer's first INSERT compiles the trigger
	// function in its session, and the watch makes its first polls.
	warm, err := insertFor(b.ctx, pool, "prod_wake", warmUp, nil)
	if err != nil {
		return err
	}
	if err := waitUntil(time.Minute, "the warm-up's jobs fetched", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(fetched) >= warm
	}); err != nil {
		return err
	}
	mu.Lock()
	fetched = map[[16]byte]time.Time{}
	mu.Unlock()
	var cmu sync.Mutex
	committed := map[[16]byte]time.Time{}
	n, err := insertFor(b.ctx, pool, "prod_wake", dur, func(id [16]byte, at time.Time) {
		cmu.Lock()
		committed[id] = at
		cmu.Unlock()
	})
	if err != nil {
		return err
	}
	err = waitUntil(time.Minute, "every job fetched", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(fetched) >= n
	})
	cancel()
	if cerr := <-consumerDone; err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	var lat []time.Duration
	for id, c := range committed {
		lat = append(lat, max(fetched[id].Sub(c), 0))
	}
	s := w.Stats()
	under, err := b.floorUnderLoad(pool, "prod_none", dur)
	if err != nil {
		return err
	}
	b.report(row{fmt.Sprintf("same producers, watched, after a %v warm-up: commit to fetch p50 / p99 / max (%d jobs, %.0f inserts/s, %d notifications, %d polls)", warmUp,
		n, perSecond(n, dur), s.Notifications, s.Polls),
		ms(percentile(lat, 50)) + " / " + ms(percentile(lat, 99)) + " / " + ms(percentile(lat, 100)),
		ms(percentile(under, 50)) + " / " + ms(percentile(under, 99)) + " / " + ms(percentile(under, 100)) +
			fmt.Sprintf(" (bare LISTEN, one INSERT at a time, under the same load; %d)", len(under)),
		ratio(float64(percentile(lat, 99)), float64(percentile(under, 99))), "p99 within 20 ms"})
	return nil
}

// insertFor has producerConns connections insert one job per transaction
// into table for dur and returns how many they inserted; with committed,
// it reports each job's id and when its INSERT returned.
func insertFor(ctx context.Context, pool *pgxpool.Pool, table string, dur time.Duration, committed func(id [16]byte, at time.Time)) (int, error) {
	return produce(ctx, pool, dur, func(conn *pgxpool.Conn) error {
		var id pgtype.UUID
		if err := conn.QueryRow(ctx, "INSERT INTO "+table+" DEFAULT VALUES RETURNING id").Scan(&id); err != nil {
			return err
		}
		if committed != nil {
			committed(id.Bytes, time.Now())
		}
		return nil
	})
}

// produce has producerConns connections each run insert, one transaction
// a call, for dur and returns how many calls they made in all.
func produce(ctx context.Context, pool *pgxpool.Pool, dur time.Duration, insert func(*pgxpool.Conn) error) (int, error) {
	var total atomic.Int64
	var first atomic.Pointer[error]
	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	for range producerConns {
		wg.Go(func() {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				first.CompareAndSwap(nil, &err)
				return
			}
			defer conn.Release()
			for time.Now().Before(deadline) {
				if err := insert(conn); err != nil {
					first.CompareAndSwap(nil, &err)
					return
				}
				total.Add(1)
			}
		})
	}
	wg.Wait()
	if e := first.Load(); e != nil {
		return 0, *e
	}
	return int(total.Load()), nil
}
