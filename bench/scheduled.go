package main

import (
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/riverqueue/river"
)

// scheduled: jobs scheduled 2 s ahead, one every 5 ms, poll interval a
// minute; how late each handler starts after its scheduled time, on this
// process's clock, next to River.
func (b *bench) scheduled() error {
	n := samples(200, 50)
	const ahead, spacing = 2 * time.Second, 5 * time.Millisecond
	if err := b.jobTable("sched"); err != nil {
		return err
	}
	var mu sync.Mutex
	due := map[[16]byte]time.Time{}
	var late []time.Duration
	collect := func(s start) {
		mu.Lock()
		defer mu.Unlock()
		if at, ok := due[s.id]; ok {
			late = append(late, s.at.Sub(at))
		}
	}
	stop, err := b.jobwatchWorker("sched", "on", collect)
	if err != nil {
		return err
	}
	for range n {
		at := time.Now().Add(ahead)
		var id pgtype.UUID
		if err := b.pool.QueryRow(b.ctx, "INSERT INTO sched (run_at) VALUES ($1) RETURNING id", at).Scan(&id); err != nil {
			return err
		}
		mu.Lock()
		due[id.Bytes] = at
		mu.Unlock()
		time.Sleep(spacing) // the pace of the schedule, not a wait for a condition
	}
	if err := waitUntil(time.Minute, "every scheduled job started", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(late) == n
	}); err != nil {
		return err
	}
	if err := stop(); err != nil {
		return err
	}
	jw := late

	for _, rc := range riverConfigs {
		mu.Lock()
		due, late = map[[16]byte]time.Time{}, nil
		mu.Unlock()
		client, stop, err := b.riverWorker("on", rc.cooldown, collect)
		if err != nil {
			return err
		}
		for i := range n {
			at := time.Now().Add(ahead)
			mu.Lock()
			due[seqKey(int64(i))] = at
			mu.Unlock()
			if _, err := client.Insert(b.ctx, benchArgs{Seq: int64(i)}, &river.InsertOpts{ScheduledAt: at}); err != nil {
				return err
			}
			time.Sleep(spacing)
		}
		err = waitUntil(time.Minute, "every scheduled River job started", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(late) == n
		})
		_ = stop()
		if err != nil {
			return err
		}
		b.report(row{fmt.Sprintf("scheduled-job lateness p50 / p99 (%d jobs 2 s ahead, poll interval 1 min); %s", n, rc.name),
			ms(percentile(jw, 50)) + " / " + ms(percentile(jw, 99)),
			ms(percentile(late, 50)) + " / " + ms(percentile(late, 99)) + " (" + rc.name + ")",
			ratio(float64(percentile(jw, 99)), float64(percentile(late, 99))), "p99 under 10 ms"})
	}
	return nil
}
