// Command bench measures jobwatch on a real PostgreSQL and prints every
// figure next to its floor measured in the same run, as a ratio.
//
//	go run ./bench            # DATABASE_URL, else pgx's defaults
//	go run ./bench -quick     # fewer samples, for a smoke run
//
// It creates a scratch database, builds and starts the example worker for
// the end-to-end figures, and drops the database at the end.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

var (
	quick = flag.Bool("quick", false, "fewer samples")
	only  = flag.String("only", "", "comma-separated steps to run: latency,bulk,scheduled,poll,producers,e2e,fanin (default all)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type row struct{ figure, jobwatch, floor, ratio, goal string }

var rows []row

func report(r row) {
	rows = append(rows, r)
	fmt.Fprintf(os.Stderr, "  %s: %s (floor %s, %s)\n", r.figure, r.jobwatch, r.floor, r.ratio)
}

func run() error {
	ctx := context.Background()
	admin := os.Getenv("DATABASE_URL")
	dbURL, drop, err := scratchDatabase(ctx, admin)
	if err != nil {
		return err
	}
	defer drop()
	pool, err := pgxpool.New(ctx, dbURL+sep(dbURL)+"pool_max_conns=20")
	if err != nil {
		return err
	}
	defer pool.Close()
	quiet := jobwatch.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))

	steps := []struct {
		name string
		fn   func(context.Context, string, *pgxpool.Pool, jobwatch.Option) error
	}{
		// Latency figures first, before the bulk steps fill the WAL and
		// start checkpoints that would land in their tails.
		{"latency", wakeLatency}, {"scheduled", scheduledLateness}, {"e2e", endToEnd}, {"fanin", fanIn},
		{"bulk", bulkInsert}, {"poll", pollCost}, {"producers", producers},
	}
	for _, step := range steps {
		if *only != "" && !slices.Contains(strings.Split(*only, ","), step.name) {
			continue
		}
		_, _ = pool.Exec(ctx, "CHECKPOINT") // start each step from a quiet disk (needs a superuser; else ignored)
		if err := step.fn(ctx, dbURL, pool, quiet); err != nil {
			return fmt.Errorf("%s: %w", step.name, err)
		}
	}
	fmt.Println("| figure | jobwatch | floor (same run) | ratio | goal |")
	fmt.Println("|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %s | %s |\n", r.figure, r.jobwatch, r.floor, r.ratio, r.goal)
	}
	return nil
}

func sep(u string) string {
	if strings.Contains(u, "://") {
		if strings.Contains(u, "?") {
			return "&"
		}
		return "?"
	}
	return " "
}

// scratchDatabase creates a database for the run and returns its URL.
func scratchDatabase(ctx context.Context, admin string) (string, func(), error) {
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return "", nil, fmt.Errorf("connect (set DATABASE_URL): %w", err)
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "jobwatch_bench_" + hex.EncodeToString(b[:])
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		conn.Close(ctx)
		return "", nil, err
	}
	drop := func() {
		_, _ = conn.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)")
		conn.Close(context.Background())
	}
	cfg := conn.Config()
	u := url.URL{Scheme: "postgres", User: url.User(cfg.User), Host: fmt.Sprintf("%s:%d", cfg.Host, cfg.Port), Path: "/" + name}
	if strings.HasPrefix(cfg.Host, "/") {
		u.Host = ""
		u.RawQuery = url.Values{"host": {cfg.Host}, "port": {fmt.Sprint(cfg.Port)}}.Encode()
	} else {
		u.RawQuery = "sslmode=disable"
	}
	if cfg.Password != "" {
		u.User = url.UserPassword(cfg.User, cfg.Password)
	}
	return u.String(), drop, nil
}

func exec1(ctx context.Context, pool *pgxpool.Pool, sql string, args ...any) error {
	_, err := pool.Exec(ctx, sql, args...)
	if err != nil {
		return fmt.Errorf("%s: %w", firstLine(sql), err)
	}
	return nil
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i > 0 {
		return s[:i]
	}
	return s
}

// ihpTriggers installs IHP's per-row notify triggers on table (the bare
// floor: a plain row trigger, NOTIFY per row).
func ihpTriggers(table, channel string) string {
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION notify_%[1]s() RETURNS TRIGGER AS $$
BEGIN PERFORM pg_notify('%[2]s', ''); RETURN new; END; $$ language plpgsql;
CREATE TRIGGER ins_%[1]s AFTER INSERT ON %[1]s FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE notify_%[1]s();
CREATE TRIGGER upd_%[1]s AFTER UPDATE ON %[1]s FOR EACH ROW WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE PROCEDURE notify_%[1]s();`, table, channel)
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p/100*float64(len(s)-1) + 0.5)
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d)/float64(time.Millisecond)) }

func ratio(a, b float64) string {
	if b == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// wakeLatency: INSERT start to JobAvailable on the caller's channel, next to
// a bare pgx LISTEN on a plain row trigger, interleaved.
func wakeLatency(ctx context.Context, dbURL string, pool *pgxpool.Pool, quiet jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "wake latency...")
	for _, t := range []string{"jobs", "bare_jobs"} {
		if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
	}
	if err := exec1(ctx, pool, ihpTriggers("bare_jobs", "bare")); err != nil {
		return err
	}
	bare, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer bare.Close(ctx)
	if _, err := bare.Exec(ctx, "LISTEN bare"); err != nil {
		return err
	}
	bareCh := make(chan struct{}, 16)
	bctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if _, err := bare.WaitForNotification(bctx); err != nil {
				return
			}
			bareCh <- struct{}{}
		}
	}()
	defer func() { stop(); wg.Wait() }()

	l, err := jobwatch.NewListener(dbURL, quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 16)
	w, err := jobwatch.WatchForJob(ctx, pool, l, "jobs", time.Hour, wake, quiet)
	if err != nil {
		return err
	}
	defer w.Close()
	for w.Stats().Polls == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond)
	for len(wake) > 0 {
		<-wake
	}

	n := 1000
	if *quick {
		n = 200
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	var jw, floor []time.Duration
	measure := func(table string, ch <-chan struct{}, wch <-chan jobwatch.Message) (time.Duration, error) {
		t0 := time.Now()
		if _, err := conn.Exec(ctx, "INSERT INTO "+table+" DEFAULT VALUES"); err != nil {
			return 0, err
		}
		select {
		case <-ch:
		case <-wch:
		case <-time.After(5 * time.Second):
			return 0, fmt.Errorf("no wake-up for %s", table)
		}
		return time.Since(t0), nil
	}
	for i := range 2 * n {
		if i%2 == 0 {
			d, err := measure("jobs", nil, wake)
			if err != nil {
				return err
			}
			jw = append(jw, d)
		} else {
			d, err := measure("bare_jobs", bareCh, nil)
			if err != nil {
				return err
			}
			floor = append(floor, d)
		}
	}
	for _, p := range []float64{50, 99} {
		a, b := percentile(jw, p), percentile(floor, p)
		goal := ""
		if p == 99 {
			goal = "p99 within 1.3x of the floor"
		}
		report(row{fmt.Sprintf("wake latency p%.0f (%d sequential inserts)", p, n), ms(a), ms(b) + " (bare pgx LISTEN, row trigger)", ratio(float64(a), float64(b)), goal})
	}
	return nil
}

// bulkInsert: one 100k-row INSERT ... SELECT with jobwatch's triggers, with
// IHP's per-row triggers, and with none; median of several runs each.
func bulkInsert(ctx context.Context, _ string, pool *pgxpool.Pool, _ jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "bulk insert...")
	tables := []string{"bulk_plain", "bulk_jobwatch", "bulk_ihp"}
	for _, t := range tables {
		if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
	}
	if err := exec1(ctx, pool, jobwatch.CreateNotificationTriggerSQL("bulk_jobwatch")); err != nil {
		return err
	}
	if err := exec1(ctx, pool, ihpTriggers("bulk_ihp", "bulk_ihp")); err != nil {
		return err
	}
	reps := 7
	if *quick {
		reps = 3
	}
	times := map[string][]time.Duration{}
	for range reps {
		for _, t := range tables {
			if err := exec1(ctx, pool, "TRUNCATE "+t); err != nil {
				return err
			}
			t0 := time.Now()
			if err := exec1(ctx, pool, "INSERT INTO "+t+" (status) SELECT 'job_status_not_started' FROM generate_series(1, 100000)"); err != nil {
				return err
			}
			times[t] = append(times[t], time.Since(t0))
		}
	}
	plain, jw, ihp := percentile(times["bulk_plain"], 50), percentile(times["bulk_jobwatch"], 50), percentile(times["bulk_ihp"], 50)
	report(row{"100k-row INSERT ... SELECT, median", ms(jw), ms(plain) + " (no trigger)", fmt.Sprintf("%+.0f%%", (float64(jw)/float64(plain)-1)*100), "at most +10%"})
	report(row{"same, IHP's per-row triggers (reference)", ms(ihp), ms(plain) + " (no trigger)", fmt.Sprintf("%+.0f%%", (float64(ihp)/float64(plain)-1)*100), ""})
	return nil
}

// scheduledLateness: jobs due 0.3 to 0.7 s ahead, poll interval 60 s; how
// late each is fetched after its run_at (server clock).
func scheduledLateness(ctx context.Context, dbURL string, pool *pgxpool.Pool, quiet jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "scheduled jobs...")
	if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL("sched")); err != nil {
		return err
	}
	l, err := jobwatch.NewListener(dbURL, quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 4)
	w, err := jobwatch.WatchForJob(ctx, pool, l, "sched", time.Minute, wake, quiet)
	if err != nil {
		return err
	}
	defer w.Close()
	n := 300
	if *quick {
		n = 60
	}
	var mu sync.Mutex
	var late []time.Duration
	done := make(chan struct{})
	var fetched atomic.Int64
	go func() {
		defer close(done)
		for fetched.Load() < int64(n) {
			select {
			case <-wake:
			case <-time.After(5 * time.Second):
				return
			}
			rows, err := pool.Query(ctx, `UPDATE sched SET status = 'job_status_running', locked_by = gen_random_uuid(), locked_at = now()
				WHERE id IN (SELECT id FROM sched WHERE status = 'job_status_not_started' AND locked_by IS NULL AND run_at <= now() FOR UPDATE SKIP LOCKED)
				RETURNING extract(epoch FROM clock_timestamp() - run_at)::float8`)
			if err != nil {
				return
			}
			for rows.Next() {
				var s float64
				_ = rows.Scan(&s)
				mu.Lock()
				late = append(late, time.Duration(s*float64(time.Second)))
				mu.Unlock()
				fetched.Add(1)
			}
			rows.Close()
		}
	}()
	for range n {
		if err := exec1(ctx, pool, "INSERT INTO sched (run_at) VALUES (now() + make_interval(secs => 0.3 + random() * 0.4))"); err != nil {
			return err
		}
		time.Sleep(3 * time.Millisecond)
	}
	<-done
	if len(late) < n {
		return fmt.Errorf("scheduled: only %d of %d jobs fetched", len(late), n)
	}
	report(row{fmt.Sprintf("scheduled-job lateness p50 / p99 (%d jobs, poll 60 s)", n), ms(percentile(late, 50)) + " / " + ms(percentile(late, 99)),
		"IHP: up to 60 s + 2 s jitter", "", "p99 under 10 ms"})
	return nil
}

// pollCost: one poll on a table of 1M finished and 100 pending jobs, with
// the recommended partial index, next to IHP's unbounded COUNT(*).
func pollCost(ctx context.Context, _ string, pool *pgxpool.Pool, quiet jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "poll cost (building 1M rows)...")
	if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL("big")); err != nil {
		return err
	}
	rowsN := 1_000_000
	if *quick {
		rowsN = 200_000
	}
	if err := exec1(ctx, pool, "INSERT INTO big (status) SELECT 'job_status_succeeded' FROM generate_series(1, $1::int)", rowsN); err != nil {
		return err
	}
	if err := exec1(ctx, pool, "INSERT INTO big SELECT FROM generate_series(1, 100)"); err != nil {
		return err
	}
	if err := exec1(ctx, pool, "VACUUM ANALYZE big"); err != nil {
		return err
	}
	wake := make(chan jobwatch.Message, 1000)
	p, err := jobwatch.PollForJob(ctx, false, pool, "big", 10*time.Millisecond, wake, quiet, jobwatch.WithJitter(0))
	if err != nil {
		return err
	}
	for p.Stats().Polls < 100 {
		time.Sleep(10 * time.Millisecond)
		for len(wake) > 0 {
			<-wake
		}
	}
	_ = p.Close()
	s := p.Stats()
	avg := s.PollTime / time.Duration(s.Polls)
	// IHP's query without the index: the floor it had.
	if err := exec1(ctx, pool, "DROP INDEX jobwatch_pending_big"); err != nil {
		return err
	}
	var noIndex []time.Duration
	for range 5 {
		t0 := time.Now()
		var c int64
		if err := pool.QueryRow(ctx, `SELECT COUNT(*) FROM big WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()`).Scan(&c); err != nil {
			return err
		}
		noIndex = append(noIndex, time.Since(t0))
	}
	var rtt time.Duration
	for range 100 {
		t0 := time.Now()
		var one int
		if err := pool.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			return err
		}
		rtt += time.Since(t0)
	}
	rtt /= 100
	report(row{fmt.Sprintf("one poll, %dk finished + 100 pending, partial index (mean of %d)", rowsN/1000, s.Polls), ms(avg),
		ms(rtt) + " (SELECT 1 round trip)", ratio(float64(avg), float64(rtt)), "under 1 ms"})
	report(row{"same table, IHP's unbounded COUNT(*) without the index (reference)", ms(percentile(noIndex, 50)), ms(rtt) + " (SELECT 1 round trip)",
		ratio(float64(percentile(noIndex, 50)), float64(rtt)), ""})
	return nil
}

// producers: 16 connections inserting single jobs, without a trigger, with
// jobwatch's triggers, and with the notify gate; then, with the gate and a
// consumer running, how long after its INSERT each job is fetched.
func producers(ctx context.Context, dbURL string, pool *pgxpool.Pool, quiet jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "concurrent producers...")
	tables := []string{"prod_plain", "prod_jobwatch", "prod_gated"}
	for _, t := range tables {
		if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
	}
	if err := exec1(ctx, pool, jobwatch.CreateNotificationTriggerSQL("prod_jobwatch")); err != nil {
		return err
	}
	if err := exec1(ctx, pool, jobwatch.CreateNotificationTriggerSQLWith("prod_gated", jobwatch.WithNotifyGate(true))); err != nil {
		return err
	}
	dur := 5 * time.Second
	if *quick {
		dur = 2 * time.Second
	}
	// Three rounds, interleaved, so that the machine's noise falls on all.
	const rounds = 3
	rates := map[string]float64{}
	for range rounds {
		for _, t := range tables {
			r, err := insertFlat(ctx, pool, t, dur)
			if err != nil {
				return err
			}
			rates[t] += r / rounds
		}
	}
	plain := rates["prod_plain"]
	report(row{"16 concurrent producers, single-row inserts/s, jobwatch's triggers", fmt.Sprintf("%.0f/s", rates["prod_jobwatch"]),
		fmt.Sprintf("%.0f/s (no trigger)", plain), ratio(rates["prod_jobwatch"], plain), "at least 0.80"})
	report(row{"same, with WithNotifyGate(true)", fmt.Sprintf("%.0f/s", rates["prod_gated"]),
		fmt.Sprintf("%.0f/s (no trigger)", plain), ratio(rates["prod_gated"], plain), "at least 0.80"})

	// Delay from INSERT to fetch under the gate, with a consumer.
	if err := exec1(ctx, pool, "TRUNCATE prod_gated"); err != nil {
		return err
	}
	l, err := jobwatch.NewListener(dbURL, quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 64)
	w, err := jobwatch.WatchForJob(ctx, pool, l, "prod_gated", time.Minute, wake, quiet, jobwatch.WithNotifyGate(true))
	if err != nil {
		return err
	}
	defer w.Close()
	cctx, stop := context.WithCancel(ctx)
	var delays []time.Duration
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		for {
			select {
			case <-cctx.Done():
				return
			case <-wake:
			}
			for {
				rows, err := pool.Query(ctx, `UPDATE prod_gated SET status = 'job_status_running', locked_at = now(), locked_by = gen_random_uuid()
					WHERE id IN (SELECT id FROM prod_gated WHERE status = 'job_status_not_started' AND locked_by IS NULL AND run_at <= now()
						LIMIT 2000 FOR UPDATE SKIP LOCKED)
					RETURNING extract(epoch FROM clock_timestamp() - created_at)::float8`)
				if err != nil {
					return
				}
				n := 0
				for rows.Next() {
					var s float64
					_ = rows.Scan(&s)
					delays = append(delays, time.Duration(s*float64(time.Second)))
					n++
				}
				rows.Close()
				if n == 0 {
					break
				}
			}
		}
	}()
	if _, err := insertFlat(ctx, pool, "prod_gated", dur); err != nil {
		stop()
		return err
	}
	var pending int
	for i := 0; i < 500; i++ {
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM prod_gated WHERE status = 'job_status_not_started'").Scan(&pending); err != nil {
			stop()
			return err
		}
		if pending == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	<-consumed
	if pending != 0 {
		return fmt.Errorf("gated producers: %d jobs never woken", pending)
	}
	report(row{fmt.Sprintf("same, gated, with a consumer: INSERT to fetch p50 / p99 / max (%d jobs)", len(delays)),
		ms(percentile(delays, 50)) + " / " + ms(percentile(delays, 99)) + " / " + ms(percentile(delays, 100)),
		"", "", "every job woken, bounded delay"})
	return nil
}

// insertFlat runs 16 connections inserting one job per transaction into
// table for dur and returns the rate.
func insertFlat(ctx context.Context, pool *pgxpool.Pool, table string, dur time.Duration) (float64, error) {
	var count atomic.Int64
	var firstErr atomic.Pointer[error]
	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if _, err := pool.Exec(ctx, "INSERT INTO "+table+" DEFAULT VALUES"); err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return 0, *e
	}
	return float64(count.Load()) / dur.Seconds(), nil
}

// endToEnd runs the example worker and measures INSERT start to job start
// (locked_at) and to job done (updated_at) for sequential jobs, then the
// burst rate of 10,000 jobs inserted in one statement, with the worker's
// synchronous_commit on and off.
func endToEnd(ctx context.Context, dbURL string, pool *pgxpool.Pool, _ jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "end to end (building the example worker)...")
	dir, err := os.MkdirTemp("", "jobwatch-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "worker")
	build := exec.Command("go", "build", "-o", bin, "./internal/runner")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build the runner (run from the repository root): %w", err)
	}
	if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL("e2e")); err != nil {
		return err
	}

	for _, syncCommit := range []string{"on", "off"} {
		stop, err := startWorker(ctx, pool, dbURL, bin, syncCommit)
		if err != nil {
			return err
		}
		err = sequential(ctx, pool, syncCommit)
		if err == nil {
			err = burst(ctx, pool, syncCommit)
		}
		stop()
		if err != nil {
			return err
		}
	}
	return nil
}

// startWorker starts the example worker on table e2e and waits until it
// watches the table.
func startWorker(ctx context.Context, pool *pgxpool.Pool, dbURL, bin, syncCommit string) (stop func(), err error) {
	worker := exec.Command(bin, "-table", "e2e", "-concurrency", "10", "-job-duration", "0", "-fail-rate", "0", "-poll", "1m",
		"-synchronous-commit", syncCommit)
	worker.Env = append(os.Environ(), "DATABASE_URL="+dbURL)
	out, err := worker.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := worker.Start(); err != nil {
		return nil, err
	}
	started := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(out)
		once := sync.Once{}
		for sc.Scan() {
			if strings.Contains(sc.Text(), "worker started") {
				once.Do(func() { close(started) })
			}
			if strings.Contains(sc.Text(), "level=ERROR") {
				fmt.Fprintln(os.Stderr, "worker:", sc.Text())
			}
		}
	}()
	stop = func() {
		_ = worker.Process.Signal(os.Interrupt)
		<-copied
		_ = worker.Wait()
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		stop()
		return nil, fmt.Errorf("the example worker did not start")
	}
	time.Sleep(100 * time.Millisecond) // its first poll
	return stop, nil
}

func sequential(ctx context.Context, pool *pgxpool.Pool, syncCommit string) error {
	n := 1000
	if *quick {
		n = 200
	}
	for range n {
		if err := exec1(ctx, pool, "INSERT INTO e2e DEFAULT VALUES"); err != nil {
			return err
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := waitAllDone(ctx, pool, "e2e", n); err != nil {
		return err
	}
	var p50s, p99s, p50d, p99d float64
	if err := pool.QueryRow(ctx, `SELECT
		percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM locked_at - created_at)),
		percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM locked_at - created_at)),
		percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)),
		percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at))
		FROM e2e`).Scan(&p50s, &p99s, &p50d, &p99d); err != nil {
		return err
	}
	sec := func(f float64) string { return ms(time.Duration(f * float64(time.Second))) }
	report(row{fmt.Sprintf("end to end, INSERT to job start p50 / p99 (%d sequential, example worker, its synchronous_commit %s)", n, syncCommit), sec(p50s) + " / " + sec(p99s),
		"see the wake latency floor above; graphile-worker 1.5 / 4.2 ms, River 2.0 / 90 ms (measurements.md)", "", "p99 under 1.5 ms"})
	report(row{"end to end, INSERT to job done p50 / p99", sec(p50d) + " / " + sec(p99d), "", "", ""})
	return exec1(ctx, pool, "TRUNCATE e2e")
}

// burst inserts 10,000 jobs in one statement and reports how fast the
// running worker starts them all.
func burst(ctx context.Context, pool *pgxpool.Pool, syncCommit string) error {
	const n = 10000
	if err := exec1(ctx, pool, "INSERT INTO e2e SELECT FROM generate_series(1, $1::int)", n); err != nil {
		return err
	}
	if err := waitAllDone(ctx, pool, "e2e", n); err != nil {
		return err
	}
	var secs float64
	if err := pool.QueryRow(ctx, "SELECT extract(epoch FROM max(locked_at) - min(created_at)) FROM e2e").Scan(&secs); err != nil {
		return err
	}
	report(row{"burst: 10,000 jobs in one INSERT until all started (concurrency 10, worker synchronous_commit " + syncCommit + ")",
		fmt.Sprintf("%.0f jobs/s", n/secs),
		"River 4.8k jobs/s (1 ms cooldown), graphile-worker 2.8k jobs/s (measurements.md)", "", "at least 10,000 jobs/s"})
	return exec1(ctx, pool, "TRUNCATE e2e")
}

func waitAllDone(ctx context.Context, pool *pgxpool.Pool, table string, n int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		var done int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE status = 'job_status_succeeded'").Scan(&done); err != nil {
			return err
		}
		if done >= n {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s: not all %d jobs done in 2 minutes", table, n)
}

// fanIn: 100 tables watched by one process use one LISTEN connection.
func fanIn(ctx context.Context, dbURL string, pool *pgxpool.Pool, quiet jobwatch.Option) error {
	fmt.Fprintln(os.Stderr, "fan-in...")
	l, err := jobwatch.NewListener(dbURL+sep(dbURL)+"application_name=jobwatch_bench_fanin", quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 256)
	for i := range 100 {
		t := fmt.Sprintf("fan_%d", i)
		if err := exec1(ctx, pool, jobwatch.CreateJobTableSQL(t)); err != nil {
			return err
		}
		w, err := jobwatch.WatchForJob(ctx, pool, l, t, time.Hour, wake, quiet)
		if err != nil {
			return err
		}
		defer w.Close()
	}
	time.Sleep(200 * time.Millisecond)
	for len(wake) > 0 {
		<-wake
	}
	for i := range 100 {
		if err := exec1(ctx, pool, fmt.Sprintf("INSERT INTO fan_%d DEFAULT VALUES", i)); err != nil {
			return err
		}
	}
	got := 0
	for got < 100 {
		select {
		case <-wake:
			got++
		case <-time.After(5 * time.Second):
			return fmt.Errorf("fan-in: %d of 100 wake-ups", got)
		}
	}
	var conns int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobwatch_bench_fanin'").Scan(&conns); err != nil {
		return err
	}
	report(row{"fan-in: 100 tables watched by one process", fmt.Sprintf("%d LISTEN connection(s), 100 of 100 woken", conns), "", "", "one connection"})
	return nil
}
