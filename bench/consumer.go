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
// live consumer in the same process, as a deployment runs them, on
// identical IHP-shaped tables whose status is a text column. The floor:
// no trigger, the consumer fetching every 5 ms. The headline: jobwatch's
// default triggers, a live watch, the consumer fetching on each wake-up.
// Between them, the steps from one to the other, each adding one piece
// (consumerSteps), so that the gap can be split: a statement trigger that
// does nothing, then with transition tables, then the gate's pieces one by
// one in a hand-written function, then jobwatch's triggers unwatched, then
// watched. Last, the gate off (every transaction notifies, watched) for
// reference. A fetch is IHP's UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
// SKIP LOCKED LIMIT 500), repeated until one takes fewer than 500. After a
// warm-up of each table, phases of 4 s interleaved in that order, each from
// an empty table after a checkpoint and ending once the consumer has
// fetched every job inserted (a warning row if it has not within 10 s);
// inserts/s is the median of 3 runs. For the headline, commit to fetch on
// the server's clock, from created_at (the INSERT's transaction start) to
// locked_at (the fetch's clock_timestamp()), over every job of the runs,
// next to the bare LISTEN floor timed while the producers and the 5 ms
// consumer run on the floor's table.
func (b *bench) consumerProducers() error {
	dur := time.Duration(samples(4, 2)) * time.Second
	runs := samples(3, 1)
	cases := consumerSteps()
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
	wakes := map[string]chan jobwatch.Message{} // the consumer's, when it fetches on each wake-up
	watches := map[string]*jobwatch.Watch{}
	for _, c := range cases {
		if err := b.exec(textStatusTable(c.table) + c.triggers); err != nil {
			return err
		}
		if c.watch != nil {
			wake := make(chan jobwatch.Message, 1)
			w, err := b.watch(l, c.table, wake, c.watch...)
			if err != nil {
				return err
			}
			defer w.Close()
			watches[c.table] = w
			if !c.tick {
				wakes[c.table] = wake
			}
		}
		// Each producer's session compiles the trigger function, the
		// consumer's its fetch.
		if _, _, err := b.consumerPhase(c.table, wakes[c.table], func() (int, error) {
			return insertFor(b.ctx, pool, c.table, warmUp, nil)
		}); err != nil {
			return err
		}
	}
	const headline = "cons_gate"
	before := watches[headline].Stats()
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
			if c.table == headline {
				d, err := b.commitToFetch(c.table)
				if err != nil {
					return err
				}
				lat = append(lat, d...)
			}
		}
	}
	after := watches[headline].Stats()
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
	b.report(row{fmt.Sprintf("%d producers with a live consumer in the same process (one job per transaction, synchronous_commit on, status text; fetches of up to %d until none is left), %v phases interleaved, median of %d: jobwatch's triggers, watched, the consumer fetching on each wake-up",
		producerConns, fetchBatch, dur, runs), fmt.Sprintf("%.0f inserts/s", median(headline)), none, ratio(median(headline), median("cons_none")), ""})
	prev := "cons_none"
	for _, c := range cases {
		if c.step {
			v := median(c.table)
			b.report(row{fmt.Sprintf("step: %s (%s the step before)", c.what, ratio(v, median(prev))),
				fmt.Sprintf("%.0f inserts/s", v), none, ratio(v, median("cons_none")), ""})
			prev = c.table
		}
	}
	b.report(row{fmt.Sprintf("step: the consumer fetching on each wake-up instead, that is the first row (%s the step before)", ratio(median(headline), median(prev))),
		fmt.Sprintf("%.0f inserts/s", median(headline)), none, ratio(median(headline), median("cons_none")), ""})
	for _, c := range cases[1:] {
		if !c.step && c.table != headline {
			v := median(c.table)
			b.report(row{"same, " + c.what, fmt.Sprintf("%.0f inserts/s", v), none, ratio(v, median("cons_none")), ""})
		}
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

// consumerCase is one table of the consumer step.
type consumerCase struct {
	table, what, triggers string
	watch                 []jobwatch.Option // nil: not watched
	tick                  bool              // watched, but the consumer fetches every 5 ms
	step                  bool              // one of the steps from the floor to the headline
}

// consumerSteps are the consumer step's tables, in the order their phases
// run: the floor, the steps from it to the headline, the headline, the
// gate off. The hand-written steps run the gate's pieces as jobwatch's
// function does on an INSERT (the notify key tried; when another holds
// it, the skip key taken shared and the skip counter bumped) and return
// at once on an UPDATE, whose fetches leave nothing pending.
func consumerSteps() []consumerCase {
	const notifyKey, skipKey = 27001, 27002
	try := fmt.Sprintf("IF TG_OP = 'UPDATE' THEN RETURN NULL; END IF; IF NOT pg_try_advisory_xact_lock(%d) THEN", notifyKey)
	return []consumerCase{
		{table: "cons_none", what: "no trigger"},
		{table: "cons_empty", what: "an empty statement trigger on INSERT and UPDATE, the consumer fetching every 5 ms (ceiling: any statement trigger)",
			triggers: statementTriggers("cons_empty", "", "RETURN NULL;"), step: true},
		{table: "cons_trans", what: "with transition tables (REFERENCING NEW TABLE), as jobwatch's",
			triggers: statementTriggers("cons_trans", transition, "RETURN NULL;"), step: true},
		{table: "cons_try", what: "the function tries the notify key on an INSERT, and does nothing with it",
			triggers: statementTriggers("cons_try", transition, try+" RETURN NULL; END IF; RETURN NULL;"), step: true},
		{table: "cons_skip", what: "when another holds the notify key, it takes the skip key shared",
			triggers: statementTriggers("cons_skip", transition, fmt.Sprintf("%s IF pg_try_advisory_xact_lock_shared(%d) THEN RETURN NULL; END IF; END IF; RETURN NULL;", try, skipKey)), step: true},
		{table: "cons_count", what: "and bumps a skip counter (the whole skip path; the key's holder does nothing)",
			triggers: "CREATE SEQUENCE cons_count_skips CYCLE;\n" + statementTriggers("cons_count", transition,
				fmt.Sprintf("%s IF pg_try_advisory_xact_lock_shared(%d) THEN PERFORM nextval('cons_count_skips'); RETURN NULL; END IF; END IF; RETURN NULL;", try, skipKey)), step: true},
		{table: "cons_notify", what: "the key's holder sends one NOTIFY with a fixed payload, which nobody listens to",
			triggers: "CREATE SEQUENCE cons_notify_skips CYCLE;\n" + statementTriggers("cons_notify", transition,
				fmt.Sprintf("%s IF pg_try_advisory_xact_lock_shared(%d) THEN PERFORM nextval('cons_notify_skips'); RETURN NULL; END IF; END IF; PERFORM pg_notify('cons_notify', 'x'); RETURN NULL;", try, skipKey)), step: true},
		{table: "cons_unwatched", what: "jobwatch's triggers instead, not watched (its function: the look at the rows on the key holder's INSERTs and on every UPDATE, the transaction's id and state)",
			triggers: jobwatch.CreateNotificationTriggerSQL("cons_unwatched"), step: true},
		{table: "cons_tick", what: "watched, the consumer still fetching every 5 ms (the Listener, the watch's wake-ups and its gate polls)",
			triggers: jobwatch.CreateNotificationTriggerSQL("cons_tick"), watch: []jobwatch.Option{}, tick: true, step: true},
		{table: "cons_gate", triggers: jobwatch.CreateNotificationTriggerSQL("cons_gate"), watch: []jobwatch.Option{}},
		{table: "cons_plain", what: "jobwatch's triggers with the gate off (every transaction notifies), watched (reference)",
			triggers: jobwatch.CreateNotificationTriggerSQLWith("cons_plain", jobwatch.WithNotifyGate(false)),
			watch:    []jobwatch.Option{jobwatch.WithNotifyGate(false)}},
	}
}

// transition is the REFERENCING clause of jobwatch's statement triggers.
const transition = "REFERENCING NEW TABLE AS jobwatch_new_rows"

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

// statementTriggers is an AFTER INSERT and an AFTER UPDATE statement
// trigger on table, with the clause referencing (or none), whose plpgsql
// function runs body.
func statementTriggers(table, referencing, body string) string {
	return fmt.Sprintf(`CREATE FUNCTION %[1]s_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN %[3]s END $$;
CREATE TRIGGER %[1]s_insert AFTER INSERT ON %[1]s %[2]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s_fn();
CREATE TRIGGER %[1]s_update AFTER UPDATE ON %[1]s %[2]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s_fn();`, table, referencing, body)
}
