package main

import (
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// gueTable describes a gue-shaped table: every row waits (finished jobs are
// deleted), due at run_at, routed by queue.
var gueTable = jobwatch.JobTable{RunAt: "run_at", Queue: "queue"}

// ihpAsCustom is IHP's table described as a custom JobTable: the rows
// IHPJobTable means, but its Pending text differs from IHPJobTable's (no
// space after the comma), so its triggers take the custom path (pinned
// search_path, rows grouped by queue).
var ihpAsCustom = jobwatch.JobTable{
	Pending: "status IN ('job_status_not_started','job_status_retry') AND locked_by IS NULL",
	RunAt:   "run_at",
}

// gueShapedSQL creates a table shaped like gue's, every column with a
// default so that DEFAULT VALUES inserts a job.
func gueShapedSQL(table string) string {
	return `CREATE TABLE ` + table + ` (job_id bigserial PRIMARY KEY, priority smallint NOT NULL DEFAULT 0,
	run_at timestamptz NOT NULL DEFAULT now(), job_type text NOT NULL DEFAULT 'x', args bytea NOT NULL DEFAULT '',
	error_count int NOT NULL DEFAULT 0, last_error text, queue text NOT NULL DEFAULT '')`
}

// jobTableProducers: the producers step's 16 connections, one job per
// transaction, synchronous_commit on, on tables described by a JobTable
// other than IHP's: a gue-shaped table with gueTable's triggers next to
// the same table without a trigger, and an IHP table with ihpAsCustom's
// triggers next to an identical one with IHP's default triggers (the
// cost of the custom path itself). Interleaved runs, each from an empty
// table after a checkpoint; the median of the runs.
func (b *bench) jobTableProducers() error {
	dur := time.Duration(samples(10, 3)) * time.Second
	runs := samples(3, 1)
	for _, sql := range []string{
		gueShapedSQL("jt_gue_none"),
		gueShapedSQL("jt_gue"), jobwatch.CreateNotificationTriggerSQLFor("jt_gue", gueTable),
		jobwatch.CreateJobTableSQL("jt_ihp_custom"), jobwatch.CreateNotificationTriggerSQLFor("jt_ihp_custom", ihpAsCustom),
	} {
		if err := b.exec(sql); err != nil {
			return err
		}
	}
	if err := b.jobTable("jt_ihp_default"); err != nil {
		return err
	}
	pool, err := newPool(b.ctx, b.url, "on", producerConns)
	if err != nil {
		return err
	}
	defer pool.Close()
	gueInsert := func(table string) func(*pgxpool.Conn) error {
		return func(conn *pgxpool.Conn) error {
			var id int64
			return conn.QueryRow(b.ctx, "INSERT INTO "+table+" DEFAULT VALUES RETURNING job_id").Scan(&id)
		}
	}
	tables := []string{"jt_gue_none", "jt_gue", "jt_ihp_default", "jt_ihp_custom"}
	rates := map[string][]float64{}
	for range runs {
		for _, t := range tables {
			if err := b.exec("TRUNCATE " + t); err != nil {
				return err
			}
			_, _ = b.pool.Exec(b.ctx, "CHECKPOINT")
			var n int
			if t == "jt_gue" || t == "jt_gue_none" {
				n, err = produce(b.ctx, pool, dur, gueInsert(t))
			} else {
				n, err = insertFor(b.ctx, pool, t, dur, nil)
			}
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
	for _, c := range []struct{ figure, table, floor, floorWhat string }{
		{fmt.Sprintf("%d producers, one job per transaction (synchronous_commit on), median of %d, gue-shaped table, %s", producerConns, runs, gueTable),
			"jt_gue", "jt_gue_none", "gue-shaped, no trigger"},
		{"same, IHP's table described as a custom JobTable (pinned search_path, grouped by queue)",
			"jt_ihp_custom", "jt_ihp_default", "IHP's default triggers, identical table"},
	} {
		v, f := median(c.table), median(c.floor)
		b.report(row{c.figure, fmt.Sprintf("%.0f inserts/s", v), fmt.Sprintf("%.0f inserts/s (%s)", f, c.floorWhat), ratio(v, f), ""})
	}
	return nil
}
