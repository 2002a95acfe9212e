package jobwatch_test

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// collector records the notifications a subscription receives.
type collector struct {
	mu  sync.Mutex
	got []string
}

func (c *collector) add(n jobwatch.Notification) {
	c.mu.Lock()
	c.got = append(c.got, n.Payload)
	c.mu.Unlock()
}

func (c *collector) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got)
}

func (c *collector) payloads() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

func notify(t *testing.T, d db, channel, payload string) {
	t.Helper()
	d.exec(t, "SELECT pg_notify($1, $2)", channel, payload)
}

func TestListenerDeliversInOrder(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	var c collector
	_, err := l.Subscribe("orders", c.add)
	require.NoError(t, err)
	for i := range 200 {
		notify(t, d, "orders", strconv.Itoa(i))
	}
	eventually(t, "200 notifications", func() bool { return c.len() == 200 })
	for i, p := range c.payloads() {
		require.Equal(t, strconv.Itoa(i), p)
	}
	assert.EqualValues(t, 200, l.Stats().Notifications)
}

// TestSlowAndPanickingCallbacks: a callback that blocks and one that panics
// delay nothing but themselves.
func TestSlowAndPanickingCallbacks(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	release := make(chan struct{})
	var blocked atomic.Int64
	_, err := l.Subscribe("a", func(jobwatch.Notification) {
		blocked.Add(1)
		<-release
	})
	require.NoError(t, err)
	var panicked collector
	_, err = l.Subscribe("a", func(n jobwatch.Notification) {
		panicked.add(n)
		panic("boom " + n.Payload)
	})
	require.NoError(t, err)
	var fine collector
	_, err = l.Subscribe("b", fine.add)
	require.NoError(t, err)

	for i := range 50 {
		notify(t, d, "a", strconv.Itoa(i))
		notify(t, d, "b", strconv.Itoa(i))
	}
	eventually(t, "b gets everything", func() bool { return fine.len() == 50 })
	eventually(t, "the panicking callback gets everything", func() bool { return panicked.len() == 50 })
	assert.EqualValues(t, 1, blocked.Load(), "the blocked callback is stuck in its first call")
	// Each panic is logged once it is recovered, after the callback counted it.
	eventually(t, "every panic logged", func() bool { return lg.count("listener callback panicked") >= 50 })
	assert.Equal(t, 50, lg.count("listener callback panicked"))
	close(release)
	eventually(t, "the blocked one catches up", func() bool { return blocked.Load() == 50 })
}

func TestUnsubscribeStopsDelivery(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	var gone, stays collector
	sub, err := l.Subscribe("c", gone.add)
	require.NoError(t, err)
	_, err = l.Subscribe("c", stays.add)
	require.NoError(t, err)
	notify(t, d, "c", "1")
	eventually(t, "first", func() bool { return gone.len() == 1 && stays.len() == 1 })
	l.Unsubscribe(sub)
	l.Unsubscribe(sub) // twice is fine
	notify(t, d, "c", "2")
	eventually(t, "second", func() bool { return stays.len() == 2 })
	assert.Equal(t, 1, gone.len())
	assert.Equal(t, 1, l.Stats().Subscriptions)
}

// TestListenerReconnects: after its backend is terminated the Listener
// reconnects, replays its LISTENs, runs OnReconnect with a live connection
// and delivers again.
func TestListenerReconnects(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	l := testListener(t, d.with(t, "application_name", "jobwatch_reconnect"), opt)
	var callbacks atomic.Int64
	l.OnReconnect(func(ctx context.Context, conn *pgx.Conn) error {
		callbacks.Add(1)
		var one int
		return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
	})
	l.OnReconnect(func(context.Context, *pgx.Conn) error { return fmt.Errorf("a failing callback") })
	var c collector
	_, err := l.Subscribe("r", c.add)
	require.NoError(t, err)
	assert.EqualValues(t, 1, callbacks.Load(), "callbacks run after the first connect")

	for round := 1; round <= 2; round++ {
		d.exec(t, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jobwatch_reconnect' AND datname = current_database()")
		eventually(t, "reconnected", func() bool { return l.Stats().Reconnects == uint64(round) && callbacks.Load() == int64(round+1) })
		notify(t, d, "r", strconv.Itoa(round))
		eventually(t, "delivered after reconnect", func() bool { return c.len() == round })
	}
	assert.Contains(t, lg.String(), "a failing callback")
	assert.NotNil(t, l.Stats().LastError)
}

func TestListenerCloseStopsEverything(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	l, err := jobwatch.NewListener(d.with(t, "application_name", "jobwatch_close"), opt)
	require.NoError(t, err)
	_, err = l.Subscribe("x", func(jobwatch.Notification) {})
	require.NoError(t, err)
	require.Equal(t, 1, d.backends(t, "jobwatch_close"), "the Listener's connection")
	require.NoError(t, l.Close())
	require.NoError(t, l.Close())
	eventually(t, "connection released", func() bool { return d.backends(t, "jobwatch_close") == 0 })
	_, err = l.Subscribe("x", func(jobwatch.Notification) {})
	assert.ErrorIs(t, err, jobwatch.ErrListenerClosed)
	// A Listener closed before it ever connected.
	l2, err := jobwatch.NewListener(d.url)
	require.NoError(t, err)
	require.NoError(t, l2.Close())
}

func TestListenerRetriesUntilServerAnswers(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	p, cfg := newProxy(t, d.url)
	p.setRefuse(true)
	l, err := jobwatch.NewListenerConfig(cfg, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	var c collector
	_, err = l.Subscribe("late", c.add) // returns after the first, failed attempt
	require.NoError(t, err)
	assert.False(t, l.Stats().Connected)
	p.setRefuse(false)
	eventually(t, "connected", func() bool { return l.Stats().Connected })
	notify(t, d, "late", "x")
	eventually(t, "delivered", func() bool { return c.len() == 1 })
}

// TestListenerDetectsBlackHole: the connection stops carrying data without
// being closed; the health check notices and the Listener reconnects.
func TestListenerDetectsBlackHole(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	p, cfg := newProxy(t, d.url)
	l, err := jobwatch.NewListenerConfig(cfg, opt, jobwatch.WithHealthCheck(100*time.Millisecond, 200*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	var c collector
	_, err = l.Subscribe("bh", c.add)
	require.NoError(t, err)
	p.blackhole()
	notify(t, d, "bh", "lost")
	eventually(t, "reconnected", func() bool { return l.Stats().Reconnects >= 1 && l.Stats().Connected })
	notify(t, d, "bh", "after")
	eventually(t, "delivered on the new connection", func() bool {
		got := c.payloads()
		return len(got) > 0 && got[len(got)-1] == "after"
	})
	assert.Contains(t, l.Stats().LastError.Error(), "health check")
}

// TestListenerStart: Start connects and returns nil once listening; for a
// server that refuses it returns the error of the attempt, and it gives
// up waiting when its context ends, the Listener retrying meanwhile.
// TestListenerStartWaitsForCallbacks: Start, and so the first Subscribe,
// returns once the OnReconnect callbacks have run on the first connection
// (a watch re-installs its triggers there), not as soon as it connects.
func TestListenerStartWaitsForCallbacks(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	l.OnReconnect(func(ctx context.Context, _ *pgx.Conn) error {
		once.Do(func() { close(entered) })
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(ctxT(t), 300*time.Millisecond)
	defer cancel()
	go func() {
		<-entered
		<-ctx.Done()
		close(release)
	}()
	require.ErrorIs(t, l.Start(ctx), context.DeadlineExceeded, "the callback had not returned")
	require.NoError(t, l.Start(ctxT(t)), "it has returned")
	assert.True(t, l.Stats().Connected)
}

func TestListenerStart(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	require.NoError(t, testListener(t, d.url, opt).Start(ctxT(t)))

	p, cfg := newProxy(t, d.url)
	p.setRefuse(true)
	l, err := jobwatch.NewListenerConfig(cfg, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	err = l.Start(ctxT(t))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "listener: connect")
	p.setRefuse(false)
	eventually(t, "connected on its own", func() bool { return l.Stats().Connected })
	require.NoError(t, l.Start(ctxT(t)))

	// A server that accepts and never answers: Start returns when its
	// context ends, and so does a watch's start-up on that Listener.
	hole, holeCfg := newProxy(t, d.url)
	hole.blackholeNew()
	slow, err := jobwatch.NewListenerConfig(holeCfg, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = slow.Close() })
	ctx, cancel := context.WithTimeout(ctxT(t), 200*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, slow.Start(ctx), context.DeadlineExceeded)
	slow2, err := jobwatch.NewListenerConfig(holeCfg, opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = slow2.Close() })
	d.jobTable(t, "jobs")
	ctx, cancel = context.WithTimeout(ctxT(t), 200*time.Millisecond)
	defer cancel()
	_, err = jobwatch.WatchForJob(ctx, d.pool, slow2, "jobs", time.Hour, make(chan jobwatch.Message, 1), opt)
	require.ErrorIs(t, err, context.DeadlineExceeded, "the watch honours its context")

	require.NoError(t, l.Close())
	require.ErrorIs(t, l.Start(ctxT(t)), jobwatch.ErrListenerClosed)
}

// TestSubscriptionReleasesBacklog: a subscriber that stalled while 4,000
// large notifications queued up holds them until it has delivered them,
// and not after: the memory comes back without Unsubscribe. Not parallel:
// it reads the process's heap.
func TestSubscriptionReleasesBacklog(t *testing.T) {
	d := newDB(t)
	_, opt := newLogs(t)
	l := testListener(t, d.url, opt)
	release := make(chan struct{})
	var delivered atomic.Int64
	_, err := l.Subscribe("backlog", func(jobwatch.Notification) {
		<-release
		delivered.Add(1)
	})
	require.NoError(t, err)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	const n, size = 4000, 8000
	_, err = d.pool.Exec(ctxT(t), "SELECT pg_notify('backlog', i::text || repeat('x', $1)) FROM generate_series(1, $2) i", size-10, n)
	require.NoError(t, err)
	eventually(t, "all received, queued for the stalled callback", func() bool { return l.Stats().Notifications == n })
	queued := heap()
	require.Greater(t, queued, before+n*size/2, "the backlog is in memory")
	close(release)
	eventually(t, "all delivered", func() bool { return delivered.Load() == n })
	after := heap()
	t.Logf("heap: %d MB before, %d MB with the backlog, %d MB once delivered", before>>20, queued>>20, after>>20)
	assert.Less(t, after, before+n*size/8, "delivered notifications are released")
}
