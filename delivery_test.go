package jobwatch_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// bouncer starts a real PgBouncer in front of d's database, stopped when
// the test ends.
func bouncer(t *testing.T, d db) *pgtest.PgBouncer {
	t.Helper()
	b, err := pgtest.StartPgBouncer(d.url)
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pgbouncer log:\n%s", b.Log())
		}
		b.Stop()
	})
	return b
}

func newPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// fastCheck makes the delivery check probe every 100ms, for tests of what
// happens after it decided.
var fastCheck = jobwatch.WithDeliveryCheck(100*time.Millisecond, 500*time.Millisecond)

// steadyCheck probes as often, for tests that count on no probe lost: a
// probe late by more than fastCheck's timeout on a loaded machine is not
// what they test.
var steadyCheck = jobwatch.WithDeliveryCheck(100*time.Millisecond, 5*time.Second)

// TestPoolThroughTransactionModePgBouncer: the pool goes through PgBouncer
// in transaction mode (with the exec mode of docs/many-workers.md), the Listener
// directly: installing, polling, notifying and the delivery check all
// work, and nothing is logged as an error.
func TestPoolThroughTransactionModePgBouncer(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	b := bouncer(t, d)
	d.jobTable(t, "jobs")
	poolURL, err := pgtest.WithParam(b.URL(pgtest.TransactionMode), "default_query_exec_mode", "exec")
	require.NoError(t, err)
	pool := newPool(t, poolURL)
	l := testListener(t, d.url, opt, steadyCheck)
	w, ch, _ := d.watch(t, opt, watchSetup{listener: l, pool: pool, noTable: true})
	require.True(t, triggersHealthy(t, pool, "jobs"), "installed through the pooler")

	_, err = pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	waitWake(t, ch, "insert through the pooler")
	eventually(t, "several probes through the pooler", func() bool { return l.Stats().DeliveryProbes >= 5 })
	assert.True(t, w.Stats().NotificationsWorking)
	assert.Zero(t, l.Stats().DeliveryProbesLost)
	assert.Equal(t, time.Hour, w.Stats().PollInterval)
	assert.NotContains(t, lg.String(), "level=ERROR")
}

// TestListenerThroughTransactionModeDetected: the Listener goes through
// PgBouncer in transaction mode, where its LISTEN does not outlive its
// transaction. With the default settings the delivery check says so in one
// error within 30s, and the watch polls every second meanwhile.
func TestListenerThroughTransactionModeDetected(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	b := bouncer(t, d)
	d.jobTable(t, "jobs")
	l := testListener(t, b.URL(pgtest.TransactionMode), opt)
	ch := make(chan jobwatch.Message, 10)
	start := time.Now()
	w, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "jobs", time.Hour, ch, opt)
	require.NoError(t, err)
	defer w.Close()
	settle(t, w, ch)
	require.True(t, l.Stats().Connected, "the Listener believes it is connected")

	eventuallyWithin(t, 30*time.Second, "the pooler detected", func() bool { return !w.Stats().NotificationsWorking })
	t.Logf("transaction-mode pooler in front of the Listener detected after %v (default settings)", time.Since(start).Round(time.Millisecond))
	assert.Equal(t, 1, lg.count("level=ERROR"), "one error")
	assert.Contains(t, lg.String(), "pooler in transaction mode")
	assert.Equal(t, time.Second, w.Stats().PollInterval, "polling every second")

	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "found by the fallback poll")
}

// TestDeliveryFailureAndRecovery: once notifications do not arrive the
// error is not repeated at every probe; when they arrive again (PgBouncer
// restarted in session mode) that is logged once and the watch goes back
// to its poll interval.
func TestDeliveryFailureAndRecovery(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	b := bouncer(t, d)
	d.jobTable(t, "jobs")
	l := testListener(t, b.URL(pgtest.TransactionMode), opt, fastCheck)
	ch := make(chan jobwatch.Message, 10)
	w, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "jobs", time.Hour, ch, opt,
		jobwatch.WithFallbackPollInterval(50*time.Millisecond))
	require.NoError(t, err)
	defer w.Close()
	eventually(t, "detected", func() bool { return !w.Stats().NotificationsWorking })
	lost := l.Stats().DeliveryProbesLost
	eventually(t, "many more probes lost", func() bool { return l.Stats().DeliveryProbesLost >= lost+10 })
	assert.Equal(t, 1, lg.count("notifications do not reach the Listener"), "said once")
	assert.Equal(t, 50*time.Millisecond, w.Stats().PollInterval)
	polls := w.Stats().Polls
	eventually(t, "fallback polls", func() bool { return w.Stats().Polls >= polls+5 })

	require.NoError(t, b.Restart("session"))
	eventually(t, "notifications arrive again", func() bool { return w.Stats().NotificationsWorking })
	assert.Equal(t, time.Hour, w.Stats().PollInterval, "back to the poll interval")
	assert.Equal(t, 1, lg.count("notifications arrive again"))
	notified := w.Stats().Notifications
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	eventually(t, "notified through the session-mode pooler", func() bool { return w.Stats().Notifications > notified })
}

// TestListenerThroughSessionModePgBouncer: a session-mode pooler in front
// of the Listener works, and the check says so.
func TestListenerThroughSessionModePgBouncer(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	b := bouncer(t, d)
	w, ch, l := startWatchWith(t, d, b.URL(pgtest.SessionMode), d.pool, opt, steadyCheck)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "through the session-mode pooler")
	eventually(t, "several probes", func() bool { return l.Stats().DeliveryProbes >= 5 })
	assert.EqualValues(t, 1, w.Stats().Notifications)
	assert.True(t, w.Stats().NotificationsWorking)
	assert.Zero(t, l.Stats().DeliveryProbesLost)
	assert.NotContains(t, lg.String(), "level=ERROR")
}

// TestListenerOnAnotherDatabase: the Listener and the pool point at two
// databases. The check names that cause, and the watch polls around it.
func TestListenerOnAnotherDatabase(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	other := newDB(t)
	lg, opt := newLogs(t)
	w, ch, _ := startWatchWith(t, d, other.url, d.pool, opt, fastCheck)
	eventually(t, "detected", func() bool { return !w.Stats().NotificationsWorking })
	assert.Contains(t, lg.String(), "different databases")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "found by the fallback poll")
	assert.EqualValues(t, 0, w.Stats().Notifications)
}

// startWatchWith watches "jobs" in d with a Listener on listenerURL (with
// listenerOpts) and pool.
func startWatchWith(t *testing.T, d db, listenerURL string, pool *pgxpool.Pool, logger jobwatch.Option,
	listenerOpts ...jobwatch.Option) (*jobwatch.Watch, chan jobwatch.Message, *jobwatch.Listener) {
	t.Helper()
	l := testListener(t, listenerURL, append(listenerOpts, logger)...)
	return d.watch(t, logger, watchSetup{listener: l, pool: pool})
}

// TestWatchJoiningAsDeliveryFails: a watch that starts while the delivery
// check is deciding that notifications do not arrive (here: held in the
// middle of its decision by a log handler that blocks on the error it
// logs) polls at the fallback interval like the others, instead of
// keeping the state it joined with.
func TestWatchJoiningAsDeliveryFails(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	other := newDB(t)
	_, opt := newLogs(t)
	h := &blockingHandler{match: "notifications do not reach", blocked: make(chan struct{}), release: make(chan struct{})}
	l := testListener(t, other.url, jobwatch.WithLogger(slog.New(h)), fastCheck)
	first, _, _ := d.watch(t, opt, watchSetup{listener: l})
	select {
	case <-h.blocked:
	case <-time.After(waitLimit):
		t.Fatal("the delivery check never decided")
	}
	late, _, _ := d.watch(t, opt, watchSetup{listener: l, noTable: true})
	close(h.release)
	for _, w := range []*jobwatch.Watch{first, late} {
		eventually(t, "polling at the fallback interval", func() bool {
			s := w.Stats()
			return !s.NotificationsWorking && s.PollInterval == time.Second
		})
	}
	polls := late.Stats().Polls
	eventually(t, "the late watch polls every second", func() bool { return late.Stats().Polls >= polls+2 })
}

// TestBriefDisconnectsNoFalseAlarm: the Listener's connection is cut
// twice, 6s apart, and comes back at once each time. Nothing says
// notifications fail, no watch falls back to polling, and the loss is
// logged once, not once per drop.
func TestBriefDisconnectsNoFalseAlarm(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	p, cfg := newProxy(t, d.url)
	l, err := jobwatch.NewListenerConfig(cfg, opt, fastCheck)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	w, _, _ := d.watch(t, opt, watchSetup{listener: l})
	cut := time.Now() // the first connection, too, lives 6s before its cut
	for i := range 2 {
		// A connection that lived 5s is replaced without backoff: each
		// outage lasts a reconnect.
		eventually(t, "6s since the last cut", func() bool { return time.Since(cut) > 6*time.Second })
		connects := l.Stats().Connects
		p.cut()
		cut = time.Now()
		eventually(t, "reconnected", func() bool { return l.Stats().Connects > connects && l.Stats().Connected })
		probes := l.Stats().DeliveryProbes
		eventually(t, "probes again", func() bool { return l.Stats().DeliveryProbes > probes+3 })
		assert.True(t, w.Stats().NotificationsWorking, "after cut %d", i+1)
		assert.Equal(t, time.Hour, w.Stats().PollInterval, "after cut %d", i+1)
	}
	assert.NotContains(t, lg.String(), "notifications do not reach")
	assert.Equal(t, 1, lg.lines("listener connection lost"), "logged once")
}

// TestListenerClosedUnderWatches: the Listener is closed before the
// watches that use it. Each watch says so once, reports notifications as
// not working, and polls at its fallback interval until it is closed.
func TestListenerClosedUnderWatches(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	w, ch, _ := d.watch(t, opt, watchSetup{listener: l})
	require.NoError(t, l.Close())
	eventually(t, "the watch knows", func() bool {
		s := w.Stats()
		return !s.NotificationsWorking && s.PollInterval == time.Second
	})
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "found by the fallback poll")
	assert.Equal(t, 1, lg.lines("Listener was closed while watches still use it"))
}
