package jobwatch_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// primaryAndStandby starts a scratch primary and a streaming standby of
// it, removed when the test ends. With sync, every commit waits for the
// standby, so a crash of the primary loses no committed job.
func primaryAndStandby(t *testing.T, sync bool) (primary, standby *pgtest.Cluster) {
	t.Helper()
	settings := []string{"fsync=off"}
	if sync {
		settings = append(settings, "synchronous_standby_names=*")
	}
	primary, err := pgtest.NewCluster(settings...)
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("primary log:\n%s", primary.Log())
		}
		primary.Remove()
	})
	standby, err = primary.Standby("fsync=off")
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("standby log:\n%s", standby.Log())
		}
		standby.Remove()
	})
	return primary, standby
}

// TestListenerOnStandby: LISTEN is refused on a standby in recovery. The
// Listener says so clearly, once, keeps retrying with its backoff, and the
// watch polls around it at the fallback interval.
func TestListenerOnStandby(t *testing.T) {
	t.Parallel()
	primary, standby := primaryAndStandby(t, false)
	lg, opt := newLogs(t)
	admin := newPool(t, primary.URL("postgres"))
	_, err := admin.Exec(ctxT(t), jobwatch.CreateJobTableSQL("jobs"))
	require.NoError(t, err)
	p, cfg := newProxy(t, standby.URL("postgres"))
	l, err := jobwatch.NewListenerConfig(cfg, opt, fastCheck)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	ch := make(chan jobwatch.Message, 10)
	w, err := jobwatch.WatchForJob(ctxT(t), admin, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	defer w.Close()
	eventually(t, "polling around the Listener", func() bool { return !w.Stats().NotificationsWorking })
	assert.False(t, l.Stats().Connected)
	assert.Contains(t, l.Stats().LastError.Error(), "standby in recovery")
	assert.Equal(t, 1, lg.count("listener cannot connect"), "said once, not at every retry")
	_, err = admin.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	waitWake(t, ch, "found by the fallback poll")
	assert.Zero(t, l.Stats().Connects)

	// A refused LISTEN backs off like a refused connection, though the
	// server answers (the delivery check sees the pool reach it every
	// second): the delays double from 0.5s, so of the next three attempts
	// the last two come at least 1+2s after the first (without a backoff
	// they would come within milliseconds).
	attempts, start := p.connections(), time.Now()
	eventuallyWithin(t, time.Minute, "three more attempts", func() bool { return p.connections() >= attempts+3 })
	t.Logf("3 connection attempts in %v", time.Since(start).Round(time.Millisecond))
	assert.GreaterOrEqual(t, time.Since(start), 3*time.Second, "backing off")
}

// TestFailover: a watch whose Listener and pool follow the primary with a
// multi-host connection string (target_session_attrs=read-write); a
// producer inserts a job every 10ms and a consumer fetches on each
// wake-up, the poll interval being an hour. The primary is stopped (a fast
// shutdown, or killed with SIGKILL) and the standby promoted: every job
// committed before and after the switch is fetched, and the triggers are
// on the new primary. The time from promotion to the first wake-up is
// reported.
func TestFailover(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"fast shutdown", "kill -9"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			primary, standby := primaryAndStandby(t, true)
			lg, opt := newLogs(t)
			url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=2&target_session_attrs=read-write",
				primary.Port, standby.Port)
			pool := newPool(t, url)
			_, ch, l := db{url: url, pool: pool}.watch(t, opt, watchSetup{capacity: 100})

			var (
				mu        sync.Mutex
				committed = map[string]time.Time{}
				fetched   = map[string]time.Time{}
				wakes     []time.Time
			)
			ctx, stopConsumer := context.WithCancel(context.Background())
			defer stopConsumer()
			produce, stopProducer := context.WithCancel(ctx)
			var wg sync.WaitGroup
			producer := newPool(t, url)
			wg.Go(func() {
				for produce.Err() == nil {
					var id string
					if err := producer.QueryRow(produce, "INSERT INTO jobs DEFAULT VALUES RETURNING id::text").Scan(&id); err == nil {
						mu.Lock()
						committed[id] = time.Now()
						mu.Unlock()
					}
					time.Sleep(10 * time.Millisecond)
				}
			})
			wg.Go(func() {
				for {
					select {
					case <-ctx.Done():
						return
					case <-ch:
					}
					mu.Lock()
					wakes = append(wakes, time.Now())
					mu.Unlock()
					// Fetch until nothing is due, retrying a failed fetch a
					// few times, as a worker does across a failover.
					for failures := 0; failures < 50 && ctx.Err() == nil; {
						rows, err := pool.Query(ctx, `UPDATE jobs SET status = 'job_status_succeeded', locked_at = now()
							WHERE id IN (SELECT id FROM jobs WHERE status = 'job_status_not_started' AND run_at <= now()
							ORDER BY run_at LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id::text`)
						var ids []string
						if err == nil {
							ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
						}
						if err != nil {
							failures++
							time.Sleep(100 * time.Millisecond)
							continue
						}
						if len(ids) == 0 {
							break
						}
						mu.Lock()
						for _, id := range ids {
							fetched[id] = time.Now()
						}
						mu.Unlock()
					}
				}
			})
			counts := func() (int, int) {
				mu.Lock()
				defer mu.Unlock()
				return len(committed), len(fetched)
			}
			eventually(t, "jobs flowing", func() bool { c, f := counts(); return c >= 20 && f >= 20 })

			if mode == "kill -9" {
				primary.Kill()
			} else {
				primary.Stop()
			}
			conn, err := pgx.Connect(ctxT(t), standby.URL("postgres"))
			require.NoError(t, err)
			_, err = conn.Exec(ctxT(t), "SELECT pg_promote()")
			require.NoError(t, err)
			promoted := time.Now()
			conn.Close(ctxT(t))

			eventually(t, "jobs flowing on the new primary", func() bool {
				mu.Lock()
				defer mu.Unlock()
				after := 0
				for _, at := range committed {
					if at.After(promoted) {
						after++
					}
				}
				return after >= 30
			})
			stopProducer()
			// Every committed job must be fetched by the consumer, which
			// fetches only when woken. The database says what was fetched:
			// a fetch whose reply was lost in the crash still took its jobs.
			eventually(t, "every job fetched", func() bool {
				// A connection the pool kept to the old primary fails once:
				// ask again, as any client does across a failover.
				var pending int
				err := pool.QueryRow(ctxT(t), "SELECT count(*) FROM jobs WHERE status = 'job_status_not_started'").Scan(&pending)
				return err == nil && pending == 0
			})
			stopConsumer()
			wg.Wait()
			var lost int
			require.NoError(t, pool.QueryRow(ctxT(t), `SELECT count(*) FROM unnest($1::uuid[]) c(id)
				WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = c.id)`, keysOf(committed)).Scan(&lost))
			assert.Zero(t, lost, "committed jobs missing from the new primary")
			var firstWake time.Duration
			for _, at := range wakes {
				if at.After(promoted) {
					firstWake = at.Sub(promoted)
					break
				}
			}
			require.NotZero(t, firstWake, "no wake-up after the promotion")
			assert.True(t, triggersHealthy(t, pool, "jobs"), "triggers on the new primary")
			t.Logf("failover (%s): %d jobs committed, every one fetched; promotion to first wake-up %v; listener reconnects %d",
				mode, len(committed), firstWake.Round(time.Millisecond), l.Stats().Reconnects)
			assert.NotContains(t, lg.String(), "notifications do not reach")
		})
	}
}

func keysOf[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
