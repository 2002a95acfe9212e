package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// newBench creates the scratch database and a pool on it.
func newBench(ctx context.Context) (*bench, func(), error) {
	admin := os.Getenv("DATABASE_URL")
	var id [4]byte
	_, _ = rand.Read(id[:])
	name := "jobwatch_bench_" + hex.EncodeToString(id[:])
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to DATABASE_URL: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return nil, nil, fmt.Errorf("create the scratch database: %w", err)
	}
	url, err := pgtest.WithDatabase(admin, name)
	if err != nil {
		return nil, nil, err
	}
	pool, err := newPool(ctx, url, "on", 20)
	if err != nil {
		return nil, nil, err
	}
	log := quietLogger()
	b := &bench{ctx: ctx, url: url, pool: pool, quiet: jobwatch.WithLogger(log), log: log}
	return b, func() {
		pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, admin)
		if err == nil {
			_, err = conn.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)")
			conn.Close(ctx)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: drop the scratch database:", err)
		}
	}, nil
}

// newPool opens a pool on url with the sessions' synchronous_commit.
func newPool(ctx context.Context, url, syncCommit string, size int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	cfg.ConnConfig.RuntimeParams["synchronous_commit"] = syncCommit
	cfg.MaxConns = size
	return pgxpool.NewWithConfig(ctx, cfg)
}

func (b *bench) exec(sql string, args ...any) error {
	_, err := b.pool.Exec(b.ctx, sql, args...)
	return err
}

// jobTable creates an IHP-shaped job table with jobwatch's triggers.
func (b *bench) jobTable(table string) error {
	if err := b.exec(jobwatch.CreateJobTableSQL(table)); err != nil {
		return err
	}
	return b.exec(jobwatch.CreateNotificationTriggerSQL(table))
}

// ihpTriggers installs IHP's per-row notify triggers on table: the bare
// floor, a plain row trigger that NOTIFYs per row.
func ihpTriggers(table, channel string) string {
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION notify_%[1]s() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('%[2]s', ''); RETURN NEW; END $$;
CREATE TRIGGER notify_%[1]s AFTER INSERT OR UPDATE ON %[1]s FOR EACH ROW
WHEN (NEW.status = 'job_status_not_started' OR NEW.status = 'job_status_retry') EXECUTE FUNCTION notify_%[1]s();`, table, channel)
}

// waitUntil waits until cond holds, checking every millisecond, for at most
// limit.
func waitUntil(limit time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v: %s", limit, what)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p / 100)
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

func ratio(a, b float64) string {
	if b == 0 {
		return ""
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func perSecond(n int, d time.Duration) float64 { return float64(n) / d.Seconds() }

// watch watches table with l (poll interval an hour) and opts, waits for
// its first poll and empties wake of what the start-up sent.
func (b *bench) watch(l *jobwatch.Listener, table string, wake chan jobwatch.Message, opts ...jobwatch.Option) (*jobwatch.Watch, error) {
	w, err := jobwatch.WatchForJob(b.ctx, b.pool, l, table, time.Hour, wake, append(opts, b.quiet)...)
	if err != nil {
		return nil, err
	}
	if err := waitUntil(10*time.Second, "first poll", func() bool { return w.Stats().Polls > 0 }); err != nil {
		w.Close()
		return nil, err
	}
	for len(wake) > 0 {
		<-wake
	}
	return w, nil
}
