package jobwatch_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCatchUpAfterReconnect: a job inserted while the Listener is
// disconnected is woken as soon as it reconnects, although the poll
// interval is an hour (IHP would wait for the next poll).
func TestCatchUpAfterReconnect(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	p := proxyTo(t, d, false)
	w, ch, l := watchThrough(t, d, p)

	p.setRefuse(true)
	p.cut()
	eventually(t, "disconnected", func() bool { return !l.Stats().Connected })
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES") // its NOTIFY reaches no one
	drain(ch)
	p.setRefuse(false)
	waitWake(t, ch, "catch-up after reconnect")
	assert.EqualValues(t, 0, w.Stats().Notifications)
}

// proxyTo starts a proxy to d's server, refusing connections from
// the start when refuse is set.
func proxyTo(t *testing.T, d db, refuse bool) *proxy {
	p, _ := newProxy(t, d.url)
	p.setRefuse(refuse)
	return p
}

// watchThrough watches "jobs" with a Listener connected through p.
func watchThrough(t *testing.T, d db, p *proxy) (*jobwatch.Watch, chan jobwatch.Message, *jobwatch.Listener) {
	t.Helper()
	_, opt := newLogs(t)
	l, err := jobwatch.NewListenerConfig(p.config, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	return d.watch(t, opt, watchSetup{listener: l})
}

// TestStalledConsumer: a caller that stops reading its channel delays no
// other table, the Listener keeps reading (the server's notification queue
// stays empty), and "channel full" is logged once per interval with a count.
func TestStalledConsumer(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.jobTable(t, "stalled")
	d.jobTable(t, "lively")
	l := testListener(t, d.url, opt)
	ctx := ctxT(t)
	stalled := make(chan jobwatch.Message, 1) // never read
	ws, err := jobwatch.WatchForJob(ctx, d.pool, l, "stalled", time.Hour, stalled, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ws.Close() })
	lively := make(chan jobwatch.Message, 1)
	wl, err := jobwatch.WatchForJob(ctx, d.pool, l, "lively", time.Hour, lively, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = wl.Close() })
	settle(t, wl, lively)
	eventually(t, "first poll", func() bool { return ws.Stats().Polls >= 1 })

	const jobs = 5000
	start := time.Now()
	conn, err := d.pool.Acquire(ctx)
	require.NoError(t, err)
	for range jobs {
		_, err := conn.Exec(ctx, "INSERT INTO stalled DEFAULT VALUES")
		require.NoError(t, err)
	}
	conn.Release()
	d.exec(t, "INSERT INTO lively DEFAULT VALUES")
	waitWake(t, lively, "the other table")

	eventually(t, "every notification read", func() bool { return ws.Stats().Notifications == jobs })
	// The queue is shared by the whole cluster and its tail advances a few
	// pages at a time, so "drained" means: less than the entries of this
	// test's jobs would fill (each takes at least 40 bytes of the 8 GB queue).
	eventually(t, "the server's notification queue is drained", func() bool {
		var usage float64
		require.NoError(t, d.pool.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage))
		return usage < float64(jobs*40)/float64(8<<30)
	})
	s := ws.Stats()
	assert.GreaterOrEqual(t, s.WakeupsDropped, uint64(jobs-1))
	// One line when it begins (debug), then at most one per interval
	// (10s) while it lasts: a loaded machine makes it last longer.
	assert.LessOrEqual(t, lg.count("wake channel full"), 2+int(time.Since(start)/(10*time.Second)), "logged at most once per interval")
}

// TestServerRestart: every backend of the database is terminated at once,
// as on a restart or failover, and the triggers are gone too. The Listener,
// the poller and the trigger repair all recover with no help.
func TestServerRestart(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, l := startWatch(t, d, "jobs", 50*time.Millisecond, 10, opt, jobwatch.WithJitter(0))
	admin, err := pgxpool.New(context.Background(), d.url)
	require.NoError(t, err)
	defer admin.Close()
	ctx := ctxT(t)
	_, err = admin.Exec(ctx, "DROP TRIGGER did_insert_job_jobs ON jobs")
	require.NoError(t, err)
	reconnects := l.Stats().Reconnects
	_, err = admin.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
	require.NoError(t, err)

	eventually(t, "listener reconnected", func() bool { return l.Stats().Reconnects > reconnects && l.Stats().Connected })
	eventually(t, "triggers repaired", func() bool {
		ok, _ := jobwatch.NotificationTriggersHealthy(ctx, admin, "jobs")
		return ok
	})
	polls := w.Stats().Polls
	eventually(t, "polling again", func() bool { return w.Stats().Polls > polls+1 })
	drain(ch)
	before := w.Stats().Notifications
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	eventually(t, "notified again", func() bool { return w.Stats().Notifications > before })
}

// TestCloseReleasesConnections: after Close nothing of the library holds a
// connection (the goroutine check runs in TestMain).
func TestCloseReleasesConnections(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	url := d.with(t, "application_name", "jobwatch_leak")
	pool, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	l, err := jobwatch.NewListener(url, opt)
	require.NoError(t, err)
	ch := make(chan jobwatch.Message, 4)
	ctx, cancel := context.WithCancel(context.Background())
	w, err := jobwatch.WatchForJob(ctx, pool, l, "jobs", 10*time.Millisecond, ch, opt)
	require.NoError(t, err)
	p, err := jobwatch.PollForJob(ctx, true, pool, "jobs", 10*time.Millisecond, ch, opt)
	require.NoError(t, err)
	eventually(t, "polling", func() bool { return w.Stats().Polls > 2 && p.Stats().Polls > 2 })
	require.GreaterOrEqual(t, d.backends(t, "jobwatch_leak"), 2, "the Listener's and the pool's connections")
	cancel()
	<-w.Done()
	<-p.Done()
	require.NoError(t, l.Close())
	pool.Close()
	eventually(t, "no connection left", func() bool { return d.backends(t, "jobwatch_leak") == 0 })
}

// TestCatchUpWhenFirstConnectFails: the Listener cannot connect when the
// watch starts, so nothing is listened to while a job is inserted; the
// first successful connect wakes the watch (the poll interval is an hour).
func TestCatchUpWhenFirstConnectFails(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	p := proxyTo(t, d, true)
	_, ch, l := watchThrough(t, d, p)
	require.False(t, l.Stats().Connected)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	p.setRefuse(false)
	waitWake(t, ch, "catch-up on the first successful connect")
}

// TestNoSendAfterClose: once Watch.Close returns nothing is sent on the
// wake channel, so the caller may close it. A notification callback is held
// in the middle of a send (its "channel full" log line blocks); Close must
// wait for it.
func TestNoSendAfterClose(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	h := &blockingHandler{match: "wake channel full", blocked: make(chan struct{}), release: make(chan struct{})}
	opt := jobwatch.WithLogger(slog.New(h))
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 1, opt)
	ch <- jobwatch.JobAvailable // full: the next wake-up is dropped and logged
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	select {
	case <-h.blocked:
	case <-time.After(waitLimit):
		t.Fatal("the callback never reached its send")
	}
	closed := make(chan struct{})
	go func() {
		_ = w.Close()
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned while a callback was still sending")
	case <-time.After(100 * time.Millisecond):
	}
	close(h.release)
	<-closed
	close(ch) // nothing may be sent any more
}

// blockingHandler blocks the first log call whose message contains match
// until release is closed.
type blockingHandler struct {
	match   string
	once    sync.Once
	blocked chan struct{}
	release chan struct{}
}

func (h *blockingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *blockingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *blockingHandler) WithGroup(string) slog.Handler            { return h }
func (h *blockingHandler) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.match) {
		h.once.Do(func() { close(h.blocked) })
		<-h.release
	}
	return nil
}
