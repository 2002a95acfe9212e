package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

const (
	fetchBatch = 500                  // jobs a fetch takes at most
	fetchEvery = 5 * time.Millisecond // the unwatched consumers' interval
)

// consumerProducers: the producers step's 16 connections (one single-row
// INSERT ... RETURNING id per transaction, synchronous_commit on) with a
// live consumer in the same process, as a deployment runs them, on four
// identical IHP-shaped tables whose status is a text column: (a) no
// trigger, the consumer fetching every 5 ms (the floor); (b) jobwatch's
// default triggers, a live watch, the consumer fetching on each wake-up;
// (c) an empty statement trigger on INSERT and UPDATE (no transition
// table), fetching every 5 ms (the cost of any statement trigger); (d)
// jobwatch's triggers without the gate, watched (reference). A fetch is
// IHP's UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT
// 500), repeated until one takes fewer than 500. After a warm-up of each
// table, phases of 4 s interleaved a, b, c, d, each from an empty table
// after a checkpoint and ending once the consumer has fetched every job
// inserted (a warning row if it has not within 10 s); inserts/s is the
// median of 3 runs. For (b), commit to fetch on the server's clock, from
// created_at (the INSERT's transaction start) to locked_at (the fetch's
// clock_timestamp()), over every job of the runs, next to the bare LISTEN
// floor timed while the producers and the 5 ms consumer run on (a)'s table.
func (b *bench) consumerProducers() error {
	dur := time.Duration(samples(4, 2)) * time.Second
	runs := samples(3, 1)
	cases := []struct {
		table, triggers string
		watch           []jobwatch.Option // nil: not watched, the consumer fetches every 5 ms
	}{
		{"cons_none", "", nil},
		{"cons_gate", jobwatch.CreateNotificationTriggerSQL("cons_gate"), []jobwatch.Option{}},
		{"cons_empty", emptyStatementTrigger("cons_empty"), nil},
		{"cons_plain", jobwatch.CreateNotificationTriggerSQLWith("cons_plain", jobwatch.WithNotifyGate(false)),
			[]jobwatch.Option{jobwatch.WithNotifyGate(false)}},
	}
	pool, err := newPool(b.ctx, b.url, "on", producerConns)
	if err != nil {
		return err
	}
	defer pool.Close()
	l, err := jobwatch.NewListener(b.url, b.quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wakes := map[string]chan jobwatch.Message{}
	watches := map[string]*jobwatch.Watch{}
	for _, c := range cases {
		if err := b.exec(textStatusTable(c.table) + c.triggers); err != nil {
			return err
		}
		if c.watch != nil {
			wakes[c.table] = make(chan jobwatch.Message, 1)
			w, err := b.watch(l, c.table, wakes[c.table], c.watch...)
			if err != nil {
				return err
			}
			defer w.Close()
			watches[c.table] = w
		}
		// Each producer's session compiles the trigger function, the
		// consumer's its fetch.
		if _, _, err := b.consumerPhase(c.table, wakes[c.table], func() (int, error) {
			return insertFor(b.ctx, pool, c.table, warmUp, nil)
		}); err != nil {
			return err
		}
	}
	before := watches["cons_gate"].Stats()
	rates := map[string][]float64{}
	var lat []time.Duration
	var warnings []row
	for run := range runs {
		for _, c := range cases {
			n, fetched, err := b.consumerPhase(c.table, wakes[c.table], func() (int, error) {
				return insertFor(b.ctx, pool, c.table, dur, nil)
			})
			if err != nil {
				return err
			}
			rates[c.table] = append(rates[c.table], perSecond(n, dur))
			if fetched != n {
				warnings = append(warnings, row{fmt.Sprintf("WARNING: consumer step, %s, run %d: %d of %d jobs fetched within 10 s", c.table, run+1, fetched, n), "", "", "", ""})
				fmt.Fprintln(os.Stderr, "  "+warnings[len(warnings)-1].figure)
			}
			if c.table == "cons_gate" {
				d, err := b.commitToFetch(c.table)
				if err != nil {
					return err
				}
				lat = append(lat, d...)
			}
		}
	}
	after := watches["cons_gate"].Stats()
	var under []time.Duration
	if _, _, err := b.consumerPhase("cons_none", nil, func() (int, error) {
		var ferr error
		under, ferr = b.floorUnderLoad(pool, "cons_none", dur)
		return 0, ferr
	}); err != nil {
		return err
	}
	median := func(t string) float64 {
		r := slices.Clone(rates[t])
		slices.Sort(r)
		return r[len(r)/2]
	}
	none := fmt.Sprintf("%.0f inserts/s (no trigger, the consumer fetching every 5 ms)", median("cons_none"))
	for _, r := range []struct{ figure, table string }{
		{fmt.Sprintf("%d producers with a live consumer in the same process (one job per transaction, synchronous_commit on, status text; fetches of up to %d until none is left), %v phases interleaved, median of %d: jobwatch's triggers, watched, the consumer fetching on each wake-up",
			producerConns, fetchBatch, dur, runs), "cons_gate"},
		{"same, an empty statement trigger on INSERT and UPDATE, the consumer fetching every 5 ms (ceiling: any statement trigger)", "cons_empty"},
		{"same, jobwatch's triggers with the gate off (every transaction notifies), watched (reference)", "cons_plain"},
	} {
		v := median(r.table)
		b.report(row{r.figure, fmt.Sprintf("%.0f inserts/s", v), none, ratio(v, median("cons_none")), ""})
	}
	b.report(row{fmt.Sprintf("same, jobwatch's triggers, watched: commit to fetch p50 / p99 / max, server clock (created_at to locked_at; %d jobs of the %d runs, %d notifications, %d polls)",
		len(lat), runs, after.Notifications-before.Notifications, after.Polls-before.Polls),
		ms(percentile(lat, 50)) + " / " + ms(percentile(lat, 99)) + " / " + ms(percentile(lat, 100)),
		ms(percentile(under, 50)) + " / " + ms(percentile(under, 99)) + " / " + ms(percentile(under, 100)) +
			fmt.Sprintf(" (bare LISTEN, one INSERT at a time, under the producers and the 5 ms consumer on the no-trigger table; %d)", len(under)),
		ratio(float64(percentile(lat, 99)), float64(percentile(under, 99))), ""})
	for _, w := range warnings {
		b.report(w)
	}
	return nil
}

// consumerPhase empties table, checkpoints and, with a consumer fetching
// from it (on each message on wake, or every 5 ms with wake nil), runs
// load, then waits up to 10 s for the consumer to have fetched as many
// jobs as load says it inserted. It returns that count and the fetched.
func (b *bench) consumerPhase(table string, wake chan jobwatch.Message, load func() (int, error)) (inserted, fetched int, err error) {
	if err := b.exec("TRUNCATE " + table); err != nil {
		return 0, 0, err
	}
	_, _ = b.pool.Exec(b.ctx, "CHECKPOINT")
	for len(wake) > 0 {
		<-wake
	}
	conn, err := b.pool.Acquire(b.ctx)
	if err != nil {
		return 0, 0, err
	}
	defer conn.Release()
	var got atomic.Int64
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() { done <- consume(b.ctx, conn, table, wake, stop, &got) }()
	n, err := load()
	if err == nil {
		_ = waitUntil(10*time.Second, "", func() bool { return int(got.Load()) >= n })
	}
	close(stop)
	if cerr := <-done; err == nil {
		err = cerr
	}
	return n, int(got.Load()), err
}

// consume fetches table's due jobs on conn, up to 500 a statement until
// one takes fewer, on each message on wake (or every 5 ms with wake nil),
// until stop is closed; it adds what it fetched to got.
func consume(ctx context.Context, conn *pgxpool.Conn, table string, wake <-chan jobwatch.Message, stop <-chan struct{}, got *atomic.Int64) error {
	var tick <-chan time.Time
	if wake == nil {
		t := time.NewTicker(fetchEvery)
		defer t.Stop()
		tick = t.C
	}
	// IHP's fetch, on the pending condition as the partial index has it;
	// with a parameter, so that pgx prepares it once.
	fetch := fmt.Sprintf(`UPDATE %[1]s SET status = 'job_status_running', locked_at = clock_timestamp(),
		locked_by = $1 WHERE id IN (SELECT id FROM %[1]s
		WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
		LIMIT %[2]d FOR UPDATE SKIP LOCKED) RETURNING id`, table, fetchBatch)
	for {
		select {
		case <-stop:
			return nil
		case <-wake:
		case <-tick:
		}
		for {
			tag, err := conn.Exec(ctx, fetch, "00000000-0000-4000-8000-000000000001")
			if err != nil {
				return err
			}
			got.Add(tag.RowsAffected())
			if tag.RowsAffected() < fetchBatch {
				break
			}
		}
	}
}

// commitToFetch returns, for each job of table fetched, its locked_at
// minus its created_at.
func (b *bench) commitToFetch(table string) ([]time.Duration, error) {
	rows, err := b.pool.Query(b.ctx, `SELECT (extract(epoch FROM locked_at - created_at) * 1e6)::bigint
		FROM `+table+` WHERE locked_at IS NOT NULL`)
	if err != nil {
		return nil, err
	}
	us, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	lat := make([]time.Duration, len(us))
	for i, u := range us {
		lat[i] = time.Duration(u) * time.Microsecond
	}
	return lat, err
}

// textStatusTable creates table as CreateJobTableSQL does, but with status
// a text column (the index is made again on the text column).
func textStatusTable(table string) string {
	return jobwatch.CreateJobTableSQL(table) + `DROP INDEX jobwatch_pending_` + table + `;
ALTER TABLE ` + table + ` ALTER COLUMN status DROP DEFAULT, ALTER COLUMN status TYPE text,
	ALTER COLUMN status SET DEFAULT 'job_status_not_started';
` + jobwatch.CreateJobTableSQL(table)
}

// emptyStatementTrigger is an AFTER INSERT and an AFTER UPDATE statement
// trigger on table whose function does nothing.
func emptyStatementTrigger(table string) string {
	return fmt.Sprintf(`CREATE FUNCTION %[1]s_nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER %[1]s_insert AFTER INSERT ON %[1]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s_nothing();
CREATE TRIGGER %[1]s_update AFTER UPDATE ON %[1]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s_nothing();`, table)
}
