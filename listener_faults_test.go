package jobwatch_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Listener alone, without a watch: one fault at each step of its
// connection loop (dial, LISTEN, wait for notifications, health check).
// Each test asserts that the Listener recovers on its own, that every
// LISTEN is in place before the OnReconnect callbacks run, that
// notifications sent after the recovery arrive, and that the problem is
// logged in one line, however many attempts or drops it takes.

// What the connection loop logs, one line per problem.
const (
	logCannotConnect = "jobwatch: listener cannot connect"
	logConnected     = "jobwatch: listener connected"
	logLost          = "jobwatch: listener connection lost"
	logReconnected   = "jobwatch: listener reconnected"
)

// reconnectRecorder is an OnReconnect callback that records, at each call,
// the channels its connection listens to (pg_listening_channels()): the
// LISTENs replayed before the callbacks run.
type reconnectRecorder struct {
	mu       sync.Mutex
	listened [][]string
}

func (r *reconnectRecorder) register(l *jobwatch.Listener) {
	l.OnReconnect(func(ctx context.Context, conn *pgx.Conn) error {
		var channels []string
		err := conn.QueryRow(ctx, "SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM pg_listening_channels() c").Scan(&channels)
		r.mu.Lock()
		r.listened = append(r.listened, channels)
		r.mu.Unlock()
		return err
	})
}

// calls returns how many times the callback ran.
func (r *reconnectRecorder) calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.listened)
}

// last returns the channels listened at the last call.
func (r *reconnectRecorder) last() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.listened) == 0 {
		return nil
	}
	return r.listened[len(r.listened)-1]
}

// refusingAddr returns an address on 127.0.0.1 that refuses connections
// (the kernel answers with a reset: ECONNREFUSED) until the test ends: a
// socket bound there and never listening holds the port, so no other test
// can start listening on it meanwhile.
func refusingAddr(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = syscall.Close(fd) })
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := syscall.Getsockname(fd)
	require.NoError(t, err)
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
}

// attempts counts a Listener's connection attempts, recorded by a hook of
// its config.
type attempts struct {
	mu   sync.Mutex
	n    int
	last time.Time // when the last attempt was recorded
}

func (a *attempts) add() {
	a.mu.Lock()
	a.n++
	a.last = time.Now()
	a.mu.Unlock()
}

// failed reports whether n attempts or more were made and l has recorded
// the failure of the last one: l is between two attempts, in its backoff.
func (a *attempts) failed(l *jobwatch.Listener, n int) bool {
	a.mu.Lock()
	made, last := a.n, a.last
	a.mu.Unlock()
	return made >= n && l.Stats().LastErrorAt.After(last)
}

// faultListener returns a Listener on cfg, closed when the test ends.
func faultListener(t *testing.T, cfg *pgx.ConnConfig, opts ...jobwatch.Option) *jobwatch.Listener {
	t.Helper()
	l, err := jobwatch.NewListenerConfig(cfg, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// TestListenerFaultDial: the server's port is closed at first (every dial
// is refused by the kernel), then it answers. Start returns the refusal;
// a channel subscribed meanwhile is listened to on the first connect,
// which runs the OnReconnect callbacks once; notifications arrive; the
// outage is logged in one line however many attempts fail, and the
// connect that ends it in one.
func TestListenerFaultDial(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	// The proxy only forwards; its config has one host and no fallbacks,
	// so that each connection attempt is one dial.
	_, cfg := newProxy(t, d.url)
	refused := refusingAddr(t)
	var down atomic.Bool
	down.Store(true)
	var dialer net.Dialer
	var tries attempts
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if down.Load() {
			tries.add()
			return dialer.DialContext(ctx, "tcp", refused)
		}
		return dialer.DialContext(ctx, network, addr)
	}
	l := faultListener(t, cfg, opt)
	var rec reconnectRecorder
	rec.register(l)

	err := l.Start(ctxT(t))
	require.Error(t, err)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED)
	var early collector
	_, err = l.Subscribe("early", early.add) // not connected: listened on connect
	require.NoError(t, err)
	eventually(t, "three attempts refused", func() bool { return tries.failed(l, 3) })
	s := l.Stats()
	assert.False(t, s.Connected)
	assert.Zero(t, s.Connects)
	assert.ErrorIs(t, s.LastError, syscall.ECONNREFUSED)
	assert.Zero(t, rec.calls(), "no callback before a connect")
	assert.Equal(t, 1, lg.lines(logCannotConnect), "one line, not one per attempt")

	down.Store(false)
	eventually(t, "connected on its own", func() bool { return l.Stats().Connected && rec.calls() == 1 })
	require.NoError(t, l.Start(ctxT(t)))
	assert.EqualValues(t, 1, l.Stats().Connects)
	assert.Contains(t, rec.last(), "early", "listened before the callbacks ran")
	var late collector
	_, err = l.Subscribe("late", late.add) // connected: listened before it returns
	require.NoError(t, err)
	notify(t, d, "early", "1")
	notify(t, d, "late", "2")
	eventually(t, "both delivered", func() bool { return early.len() == 1 && late.len() == 1 })
	assert.Equal(t, []string{"1"}, early.payloads())
	assert.Equal(t, []string{"2"}, late.payloads())

	assert.Equal(t, 1, lg.lines(logCannotConnect))
	assert.Equal(t, 1, lg.lines(logConnected), "the end of the outage, once")
	assert.Equal(t, 1, lg.lines("level=ERROR"), "nothing else is an error")
	assert.Zero(t, lg.lines("level=WARN"))
}

// TestListenerFaultListen: the server answers but the LISTEN fails, attempt
// after attempt, then succeeds.
//
// "standby": the Listener points at a standby in recovery, where the
// server refuses LISTEN (SQLSTATE 25006), until it is promoted. This is
// the one refusal PostgreSQL has for LISTEN: it needs no privilege, and
// read-only transactions (default_transaction_read_only, a role's setting)
// allow it.
//
// "cut at LISTEN": the proxy cuts the connection between the end of the
// connect and the LISTEN (the pgx AfterConnect hook cuts it), until it
// stops doing so.
//
// Either way Start returns the failure, no attempt counts as a connect or
// runs the callbacks, it is logged in one line, and once the LISTEN
// succeeds the channel subscribed meanwhile receives notifications.
func TestListenerFaultListen(t *testing.T) {
	t.Parallel()
	t.Run("standby", func(t *testing.T) {
		t.Parallel()
		_, standby := primaryAndStandby(t, false)
		cfg, err := pgx.ParseConfig(standby.URL("postgres"))
		require.NoError(t, err)
		pool := newPool(t, standby.URL("postgres"))
		listenFailsThenWorks(t, cfg,
			func(t *testing.T, err error) {
				var pgErr *pgconn.PgError
				require.ErrorAs(t, err, &pgErr)
				assert.Equal(t, "25006", pgErr.Code)
				assert.Contains(t, err.Error(), "standby in recovery", "says why")
			},
			func() {
				var promoted bool
				require.NoError(t, pool.QueryRow(ctxT(t), "SELECT pg_promote()").Scan(&promoted))
				require.True(t, promoted)
			},
			func(channel, payload string) {
				_, err := pool.Exec(ctxT(t), "SELECT pg_notify($1, $2)", channel, payload)
				require.NoError(t, err)
			})
	})
	t.Run("cut at LISTEN", func(t *testing.T) {
		t.Parallel()
		d := newDB(t)
		p, cfg := newProxy(t, d.url)
		var cutting atomic.Bool
		cutting.Store(true)
		cfg.AfterConnect = func(context.Context, *pgconn.PgConn) error {
			if cutting.Load() {
				p.cut()
			}
			return nil
		}
		listenFailsThenWorks(t, cfg,
			func(t *testing.T, err error) {
				var pgErr *pgconn.PgError
				assert.False(t, errors.As(err, &pgErr), "not the server's refusal: %v", err)
				assert.Contains(t, err.Error(), "listen")
			},
			func() { cutting.Store(false) },
			func(channel, payload string) { notify(t, d, channel, payload) })
	})
}

// listenFailsThenWorks runs a Listener on cfg while its LISTEN fails
// (checkErr checks the failure Start returns), until fix makes it work;
// notify sends a notification to the Listener's server.
func listenFailsThenWorks(t *testing.T, cfg *pgx.ConnConfig, checkErr func(*testing.T, error), fix func(), notify func(channel, payload string)) {
	t.Helper()
	lg, opt := newLogs(t)
	// Every attempt gets as far as AfterConnect, just before its LISTEN.
	// (Counting dials would not do: pgx also dials to send a cancel
	// request when it drops a connection.)
	var tries attempts
	after := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, conn *pgconn.PgConn) error {
		tries.add()
		if after != nil {
			return after(ctx, conn)
		}
		return nil
	}
	l := faultListener(t, cfg, opt)
	var rec reconnectRecorder
	rec.register(l)

	err := l.Start(ctxT(t))
	require.Error(t, err)
	checkErr(t, err)
	var c collector
	_, err = l.Subscribe("meanwhile", c.add) // not connected: listened on connect
	require.NoError(t, err)
	eventually(t, "three attempts failed", func() bool { return tries.failed(l, 3) })
	s := l.Stats()
	assert.False(t, s.Connected)
	assert.Zero(t, s.Connects, "a connection whose LISTEN failed is no connect")
	require.Error(t, s.LastError)
	checkErr(t, s.LastError)
	assert.Zero(t, rec.calls(), "no callback without the LISTENs")
	assert.Equal(t, 1, lg.lines(logCannotConnect), "one line, not one per attempt")

	fix()
	eventually(t, "connected on its own", func() bool { return l.Stats().Connected && rec.calls() == 1 })
	require.NoError(t, l.Start(ctxT(t)))
	assert.EqualValues(t, 1, l.Stats().Connects)
	assert.Contains(t, rec.last(), "meanwhile", "listened before the callbacks ran")
	notify("meanwhile", "after")
	eventually(t, "delivered", func() bool { return c.len() == 1 })
	assert.Equal(t, []string{"after"}, c.payloads())

	assert.Equal(t, 1, lg.lines(logCannotConnect))
	assert.Equal(t, 1, lg.lines(logConnected), "the end of the failure, once")
	assert.Equal(t, 1, lg.lines("level=ERROR"), "nothing else is an error")
	assert.Zero(t, lg.lines("level=WARN"))
}

// TestListenerFaultWait: the connection is lost while the Listener waits
// for notifications, three times in a row, by the server
// (pg_terminate_backend of its backend) or the network (the proxy cuts
// it). Each time it reconnects, replays every LISTEN (an UNLISTENed
// channel not) before the OnReconnect callbacks, which run once more
// (one removed with AfterReconnect's function no more), and notifications
// sent after it arrive, once each. The losses are logged in one line, and
// the first reconnect in one.
func TestListenerFaultWait(t *testing.T) {
	t.Parallel()
	for _, fault := range []string{"backend terminated", "connection cut"} {
		t.Run(fault, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			lg, opt := newLogs(t)
			var (
				l    *jobwatch.Listener
				drop func()
			)
			switch fault {
			case "backend terminated":
				const app = "jobwatch_fault_wait"
				l = testListener(t, d.with(t, "application_name", app), opt)
				drop = func() {
					var n int
					require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
						FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()`, app).Scan(&n))
					require.Equal(t, 1, n, "the Listener's backend")
				}
			case "connection cut":
				p, cfg := newProxy(t, d.url)
				l = faultListener(t, cfg, opt)
				drop = p.cut
			}
			var rec reconnectRecorder
			rec.register(l)
			var removed atomic.Int64
			remove := l.AfterReconnect(func(context.Context, *pgx.Conn) error {
				removed.Add(1)
				return nil
			})

			var early, late, gone collector
			_, err := l.Subscribe("early", early.add) // starts the Listener
			require.NoError(t, err)
			_, err = l.Subscribe("late", late.add)
			require.NoError(t, err)
			sub, err := l.Subscribe("gone", gone.add)
			require.NoError(t, err)
			l.Unsubscribe(sub)
			require.Equal(t, 1, rec.calls())

			for round := 1; round <= 3; round++ {
				if round == 2 {
					remove()
				}
				drop()
				eventually(t, "reconnected", func() bool {
					s := l.Stats()
					return s.Connected && s.Connects > uint64(round) && rec.calls() > round
				})
				require.EqualValues(t, round+1, l.Stats().Connects, "one reconnect per loss")
				require.Equal(t, round+1, rec.calls(), "the callbacks once more")
				listened := rec.last()
				assert.Contains(t, listened, "early", "round %d", round)
				assert.Contains(t, listened, "late", "round %d", round)
				assert.NotContains(t, listened, "gone", "round %d", round)
				// Sent first: had it been listened to, it would arrive first.
				payload := strconv.Itoa(round)
				notify(t, d, "gone", payload)
				notify(t, d, "early", payload)
				notify(t, d, "late", payload)
				eventually(t, "delivered after the reconnect", func() bool { return early.len() == round && late.len() == round })
				assert.EqualValues(t, 2*round, l.Stats().Notifications, "nothing received on the UNLISTENed channel")
			}
			assert.EqualValues(t, 2, removed.Load(), "the first connect and the first reconnect")
			assert.Equal(t, []string{"1", "2", "3"}, early.payloads())
			assert.Equal(t, []string{"1", "2", "3"}, late.payloads())
			assert.Zero(t, gone.len())
			assert.EqualValues(t, 3, l.Stats().Reconnects)
			assert.Error(t, l.Stats().LastError)

			assert.Equal(t, 1, lg.lines(logLost), "one line for three losses")
			assert.Equal(t, 1, lg.lines(logReconnected))
			assert.Equal(t, 1, lg.lines("level=WARN"), "nothing else is a warning")
			assert.Zero(t, lg.lines("level=ERROR"))
		})
	}
}

// TestListenerFaultHealthCheck: the connection goes silently dead (the
// proxy stops forwarding but keeps it open: no FIN, no RST, as behind a
// firewall that dropped its state). The health check notices within its
// interval plus its timeout, the Listener reconnects, replays its LISTENs,
// runs the callbacks once more, and notifications arrive again; the loss
// is logged in one line that names the health check. Before that the
// check passes on the live connection without a reconnect.
func TestListenerFaultHealthCheck(t *testing.T) {
	t.Parallel()
	const interval, timeout = 250 * time.Millisecond, 250 * time.Millisecond
	// slack allows for the scheduling of a busy machine (the race
	// detector, parallel tests); TCP alone would take minutes or hours.
	const slack = 500 * time.Millisecond
	d := newDB(t)
	lg, opt := newLogs(t)
	p, cfg := newProxy(t, d.url)
	l := faultListener(t, cfg, opt, jobwatch.WithHealthCheck(interval, timeout))
	var rec reconnectRecorder
	rec.register(l)
	var early, late collector
	_, err := l.Subscribe("early", early.add)
	require.NoError(t, err)
	_, err = l.Subscribe("late", late.add)
	require.NoError(t, err)
	// Without a watch the Listener's queries are its health checks: once
	// it has sent three on one connection, two have passed.
	eventually(t, "health checks passing", func() bool { return l.Stats().Queries >= 3 })
	require.EqualValues(t, 1, l.Stats().Connects, "no reconnect while the connection is alive")
	notify(t, d, "early", "before")
	eventually(t, "delivered before", func() bool { return early.len() == 1 })

	start := time.Now()
	p.blackhole()
	eventuallyWithin(t, interval+timeout+slack, "the dead connection noticed", func() bool {
		s := l.Stats()
		return !s.Connected || s.Connects > 1
	})
	t.Logf("silently dead connection noticed after %v (interval %v + timeout %v)", time.Since(start).Round(time.Millisecond), interval, timeout)
	eventually(t, "reconnected", func() bool { return l.Stats().Connected && rec.calls() == 2 })
	s := l.Stats()
	assert.EqualValues(t, 2, s.Connects)
	require.Error(t, s.LastError)
	assert.Contains(t, s.LastError.Error(), "health check")
	assert.Contains(t, rec.last(), "early")
	assert.Contains(t, rec.last(), "late")
	notify(t, d, "early", "after")
	notify(t, d, "late", "after")
	eventually(t, "delivered after", func() bool { return early.len() == 2 && late.len() == 1 })
	assert.Equal(t, []string{"before", "after"}, early.payloads())
	assert.Equal(t, []string{"after"}, late.payloads())

	assert.Equal(t, 1, lg.lines(logLost))
	assert.Equal(t, 1, lg.lines("health check"), "the line names the check")
	assert.Equal(t, 1, lg.lines(logReconnected))
	assert.Equal(t, 1, lg.lines("level=WARN"), "nothing else is a warning")
	assert.Zero(t, lg.lines("level=ERROR"))
}
