package main

import (
	"fmt"
	"time"

	"github.com/jobwatch-go/jobwatch"
)

// pollCost: one poll on a table of 1M finished and 100 pending jobs, with
// the recommended partial index, next to a SELECT 1 round trip and to IHP's
// unbounded COUNT(*) without the index.
func (b *bench) pollCost() error {
	rows := samples(1_000_000, 200_000)
	if err := b.exec(jobwatch.CreateJobTableSQL("big")); err != nil {
		return err
	}
	if err := b.exec("INSERT INTO big (status) SELECT 'job_status_succeeded' FROM generate_series(1, $1::int)", rows); err != nil {
		return err
	}
	if err := b.exec("INSERT INTO big SELECT FROM generate_series(1, 100)"); err != nil {
		return err
	}
	if err := b.exec("VACUUM ANALYZE big"); err != nil {
		return err
	}
	wake := make(chan jobwatch.Message, 1000)
	p, err := jobwatch.PollForJob(b.ctx, false, b.pool, "big", 10*time.Millisecond, wake, b.quiet, jobwatch.WithJitter(0))
	if err != nil {
		return err
	}
	err = waitUntil(time.Minute, "100 polls", func() bool {
		for len(wake) > 0 {
			<-wake
		}
		return p.Stats().Polls >= 100
	})
	_ = p.Close()
	if err != nil {
		return err
	}
	s := p.Stats()
	avg := s.PollTime / time.Duration(s.Polls)
	var rtt time.Duration
	for range 100 {
		t0 := time.Now()
		if err := b.exec("SELECT 1"); err != nil {
			return err
		}
		rtt += time.Since(t0)
	}
	rtt /= 100
	if err := b.exec("DROP INDEX jobwatch_pending_big"); err != nil {
		return err
	}
	var noIndex []time.Duration
	for range 5 {
		t0 := time.Now()
		if err := b.exec(`SELECT COUNT(*) FROM big WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()`); err != nil {
			return err
		}
		noIndex = append(noIndex, time.Since(t0))
	}
	b.report(row{fmt.Sprintf("one poll, %dk finished + 100 pending, partial index (mean of %d)", rows/1000, s.Polls), ms(avg),
		ms(rtt) + " (SELECT 1 round trip)", ratio(float64(avg), float64(rtt)), "under 1 ms"})
	b.report(row{"same table, IHP's unbounded COUNT(*) without the index (reference)", ms(percentile(noIndex, 50)),
		ms(rtt) + " (SELECT 1 round trip)", ratio(float64(percentile(noIndex, 50)), float64(rtt)), ""})
	return nil
}
