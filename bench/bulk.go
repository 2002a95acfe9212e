package main

import (
	"fmt"
	"time"

	"github.com/jobwatch-go/jobwatch"
)

// bulkInsert: one INSERT ... SELECT of 1M rows with jobwatch's triggers,
// with IHP's per-row triggers and with none, interleaved, each from an
// empty table after a checkpoint; the median of the runs.
func (b *bench) bulkInsert() error {
	rows, runs := samples(1_000_000, 100_000), samples(3, 1)
	tables := []string{"bulk_none", "bulk_jobwatch", "bulk_ihp"}
	for _, t := range tables {
		if err := b.exec(jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
	}
	if err := b.exec(jobwatch.CreateNotificationTriggerSQL("bulk_jobwatch")); err != nil {
		return err
	}
	if err := b.exec(ihpTriggers("bulk_ihp", "bulk_ihp")); err != nil {
		return err
	}
	times := map[string][]time.Duration{}
	for range runs {
		for _, t := range tables {
			if err := b.exec("TRUNCATE " + t); err != nil {
				return err
			}
			_, _ = b.pool.Exec(b.ctx, "CHECKPOINT")
			t0 := time.Now()
			if err := b.exec("INSERT INTO "+t+" SELECT FROM generate_series(1, $1::int)", rows); err != nil {
				return err
			}
			times[t] = append(times[t], time.Since(t0))
		}
	}
	none := percentile(times["bulk_none"], 50)
	change := func(t time.Duration) string { return fmt.Sprintf("%+.1f%%", (float64(t)/float64(none)-1)*100) }
	for _, c := range []struct{ table, what, goal string }{
		{"bulk_jobwatch", fmt.Sprintf("%dk-row INSERT ... SELECT, median of %d", rows/1000, runs), "at most +10%"},
		{"bulk_ihp", "same, IHP's per-row triggers (reference)", ""},
	} {
		d := percentile(times[c.table], 50)
		b.report(row{c.what, ms(d), ms(none) + " (no trigger)", change(d), c.goal})
	}
	return nil
}
