package jobwatch_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The notify gate (on by default): of the transactions inserting jobs at
// the same time only the one holding the table's notify key notifies. Each
// test below has a transaction take the key, another skip behind it, and
// then the holder does something other than commit at once; the skipped
// job must still be woken, the poll interval being an hour. The delay from
// its commit to the wake-up is logged: the design bound is 500ms (one
// check of the skip counter), the 1s.

// holder begins a transaction that inserts a job, taking the notify key.
func holder(t *testing.T, d db) (pgx.Tx, *pgx.Conn) {
	t.Helper()
	conn, err := pgx.Connect(ctxT(t), d.url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	tx, err := conn.Begin(ctxT(t))
	require.NoError(t, err)
	_, err = tx.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	return tx, conn
}

// skipped inserts a job in its own transaction behind the holder, checks
// that it did skip, and returns when it committed.
func skipped(t *testing.T, d db, o *observer) time.Time {
	t.Helper()
	var committed time.Time
	got := o.during(t, func() {
		d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
		committed = time.Now()
	})
	require.Empty(t, got, "the second transaction skipped its NOTIFY")
	return committed
}

func wokenAfter(t *testing.T, ch <-chan jobwatch.Message, committed time.Time, what string) {
	t.Helper()
	waitWake(t, ch, what)
	t.Logf("%s: woken %v after its commit", what, time.Since(committed).Round(time.Millisecond))
}

// TestGateHolder: the holder of the notify key stays open, rolls back, or
// its session is killed, after another transaction's job skipped behind
// it.
func TestGateHolder(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		then func(t *testing.T, d db, tx pgx.Tx, conn *pgx.Conn)
		// commits: the holder commits in the end, and its own job is woken
		commits bool
	}{
		{"stays open", func(*testing.T, db, pgx.Tx, *pgx.Conn) {}, true},
		{"rolls back", func(t *testing.T, _ db, tx pgx.Tx, _ *pgx.Conn) { require.NoError(t, tx.Rollback(ctxT(t))) }, false},
		{"session killed", func(t *testing.T, d db, _ pgx.Tx, conn *pgx.Conn) {
			d.exec(t, "SELECT pg_terminate_backend($1)", conn.PgConn().PID())
		}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
			o := observe(t, d, "jobs")
			tx, conn := holder(t, d)
			committed := skipped(t, d, o)
			c.then(t, d, tx, conn)
			wokenAfter(t, ch, committed, "skipped job, the holder "+c.name)
			assert.EqualValues(t, 0, w.Stats().Notifications, "nobody notified")
			if c.commits {
				require.NoError(t, tx.Commit(ctxT(t)))
				waitWake(t, ch, "the holder's own job, at its commit")
				eventually(t, "the holder notified", func() bool { return w.Stats().Notifications == 1 })
			}
		})
	}
}

// TestGateSkipperStaysOpen: a producer that skipped holds its transaction
// open after inserting; the holder commits and notifies; the skipped job
// is woken when its transaction commits, however long after.
func TestGateSkipperStaysOpen(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	tx, _ := holder(t, d)
	skipper := beginWith(t, d, "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, tx.Commit(ctxT(t)))
	waitWake(t, ch, "the holder's notification")
	polls := w.Stats().Polls
	eventually(t, "the watch keeps looking while the skipper is open", func() bool { return w.Stats().Polls > polls+2 })
	drain(ch)
	require.NoError(t, skipper.Commit(ctxT(t)))
	committed := time.Now()
	wokenAfter(t, ch, committed, "skipped job, committed late")
	assert.EqualValues(t, 1, w.Stats().Notifications, "the skipper did not notify")

	// Without contention every transaction notifies.
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "uncontended insert")
	eventually(t, "notified", func() bool { return w.Stats().Notifications == 2 })
}

// TestGateBurst: 16 producers insert single-row jobs at once. Few of them
// notify; a consumer that fetches only when woken gets every job; and a
// plain LISTEN, as an IHP worker has, is still woken.
func TestGateBurst(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 16, opt)
	ihp := observe(t, d, "jobs")
	const producers, each = 16, 50
	var wg sync.WaitGroup
	for range producers {
		wg.Go(func() {
			for range each {
				if _, err := d.pool.Exec(context.Background(), "INSERT INTO jobs DEFAULT VALUES"); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	fetched := 0
	deadline := time.After(waitLimit)
	for fetched < producers*each {
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("%d of %d jobs fetched", fetched, producers*each)
		}
		var n int
		require.NoError(t, d.pool.QueryRow(ctxT(t), `WITH f AS (UPDATE jobs SET status = 'job_status_succeeded'
			WHERE status = 'job_status_not_started' RETURNING 1) SELECT count(*) FROM f`).Scan(&n))
		fetched += n
	}
	wg.Wait()
	notified := w.Stats().Notifications
	t.Logf("%d jobs from %d concurrent producers: %d notifications", producers*each, producers, notified)
	assert.Less(t, notified, uint64(producers*each), "some transactions skipped")
	got := ihp.during(t, func() {})
	assert.NotEmpty(t, got, "a plain LISTEN (IHP) heard the burst")
}

// TestIdleCostFlatInTables: an idle process watching 1 table and one
// watching 20 send the same number of queries: the gate's periodic check
// is one query per Listener and pool for all their tables, and an idle
// watch sends nothing between its interval polls.
func TestIdleCostFlatInTables(t *testing.T) {
	t.Parallel()
	perSecond := map[int]float64{}
	for _, tables := range []int{1, 20} {
		d := newDB(t)
		_, opt := newLogs(t)
		// Without the health and delivery checks, one query each every 10s
		// whatever the tables, which would land in one window and not the other.
		l := testListener(t, d.url, opt, jobwatch.WithHealthCheck(0, 0), jobwatch.WithDeliveryCheck(0, 0))
		var ws []*jobwatch.Watch
		for i := range tables {
			w, _, _ := d.watch(t, opt, watchSetup{table: fmt.Sprintf("jobs_%d", i), listener: l})
			ws = append(ws, w)
		}
		queries := func() uint64 {
			n := l.Stats().Queries
			for _, w := range ws {
				n += w.Stats().Queries
			}
			return n
		}
		// The window: six of the Listener's gate checks (one every 500ms).
		before, checks, start := queries(), l.Stats().Queries, time.Now()
		eventually(t, "six gate checks", func() bool { return l.Stats().Queries >= checks+6 })
		perSecond[tables] = float64(queries()-before) / time.Since(start).Seconds()
	}
	t.Logf("idle queries per second: %.1f watching 1 table, %.1f watching 20", perSecond[1], perSecond[20])
	assert.Greater(t, perSecond[1], 0.0, "the gate is checked")
	assert.LessOrEqual(t, perSecond[20], perSecond[1]+1, "flat in the number of tables")
}
