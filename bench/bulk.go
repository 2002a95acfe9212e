package main

import (
	"fmt"
	"time"

	"github.com/jobwatch-go/jobwatch"
)

// bulkInsert: one INSERT ... SELECT of 1M rows with jobwatch's triggers,
// with IHP's per-row triggers and with none; on the same IHP table
// described as a custom JobTable (ihpAsCustom); and on a gue-shaped table
// with gueTable's triggers and with none. Interleaved, each from an empty
// table after a checkpoint; the median of the runs.
func (b *bench) bulkInsert() error {
	rows, runs := samples(1_000_000, 100_000), samples(3, 1)
	tables := []string{"bulk_none", "bulk_jobwatch", "bulk_ihp", "bulk_ihp_custom", "bulk_gue_none", "bulk_gue"}
	for _, t := range tables[:4] {
		if err := b.exec(jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
	}
	for _, sql := range []string{
		jobwatch.CreateNotificationTriggerSQL("bulk_jobwatch"),
		ihpTriggers("bulk_ihp", "bulk_ihp"),
		jobwatch.CreateNotificationTriggerSQLFor("bulk_ihp_custom", ihpAsCustom),
		gueShapedSQL("bulk_gue_none"),
		gueShapedSQL("bulk_gue"), jobwatch.CreateNotificationTriggerSQLFor("bulk_gue", gueTable),
	} {
		if err := b.exec(sql); err != nil {
			return err
		}
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
	for _, c := range []struct{ table, floor, what, floorWhat, goal string }{
		{"bulk_jobwatch", "bulk_none", fmt.Sprintf("%dk-row INSERT ... SELECT, median of %d", rows/1000, runs), "no trigger", "at most +10%"},
		{"bulk_ihp", "bulk_none", "same, IHP's per-row triggers (reference)", "no trigger", ""},
		{"bulk_ihp_custom", "bulk_none", "same, IHP's table described as a custom JobTable (pinned search_path, grouped by queue)", "no trigger", ""},
		{"bulk_gue", "bulk_gue_none", fmt.Sprintf("same, gue-shaped table, %s", gueTable), "gue-shaped, no trigger", ""},
	} {
		d, floor := percentile(times[c.table], 50), percentile(times[c.floor], 50)
		b.report(row{c.what, ms(d), ms(floor) + " (" + c.floorWhat + ")", fmt.Sprintf("%+.1f%%", (float64(d)/float64(floor)-1)*100), c.goal})
	}
	return nil
}
