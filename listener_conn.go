package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The Listener's connection loop. One goroutine runs it and is the only one
// that touches the connection, and the only one that writes l.state:
//
//	connect ──► LISTEN every channel ──► OnReconnect callbacks ──► serve
//	   ▲                                                              │
//	   └──── back off: none after a connection that lived, else ◄─────┘
//	         0.5s doubling to 60s; cut short by retryNow only while
//	         the server cannot be reached at all
//
// serve waits for notifications and, between them, applies subscription
// changes (LISTEN/UNLISTEN) and runs the health check. Subscribe and
// Unsubscribe only record the change under l.mu and interrupt the wait.

const (
	minBackoff     = 500 * time.Millisecond
	maxBackoff     = 60 * time.Second
	connectTimeout = 10 * time.Second
	// lived is how long a connection must have served for the next
	// attempt to come at once, without backoff.
	lived = 5 * time.Second
	// connRemind is how often a connection problem that lasts (or keeps
	// coming back) is logged again; a connection that stays up that long
	// ends the problem.
	connRemind = 5 * time.Minute
)

// connState is the Listener's connection as the loop last left it.
type connState struct {
	gen    uint64         // successful connects so far: each one is a new generation
	up     bool           // connected and listening
	ready  bool           // up, and the OnReconnect callbacks have run on this connection
	tried  bool           // the first attempt is over
	server serverIdentity // what the connection said of its server at connect
	pid    uint32         // the connection's backend process id
	// present are the presence keys held on the connection now (see
	// present): a map replaced on change, never written.
	present map[int32]bool
	refused map[int32]bool // presence keys another session holds already: not held
	err     error          // the last connection error; nil if none
	errAt   time.Time
	// reachable: the last failure was not one of reaching the server
	// (it answered, then refused the LISTEN or dropped the connection),
	// so a hint that the server answers again does not help.
	reachable bool
}

// connection returns the state and a channel closed at its next change.
func (l *Listener) connection() (connState, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state, l.changed
}

// setState changes the state (the loop alone calls it) and wakes those
// waiting for a change.
func (l *Listener) setState(change func(*connState)) {
	l.mu.Lock()
	change(&l.state)
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// failure is how one connection ended: the error, and whether the server
// could be reached at all.
type failure struct {
	err       error
	reachable bool
}

// run is the connection loop; it returns when Close cancels l.ctx.
func (l *Listener) run() {
	defer close(l.done)
	retry := backoff{min: minBackoff, max: maxBackoff}
	for {
		start := time.Now()
		served, f := l.session()
		if l.ctx.Err() != nil {
			return
		}
		l.setState(func(s *connState) {
			s.up, s.tried, s.err, s.errAt, s.reachable = false, true, f.err, time.Now(), f.reachable
		})
		l.connLog.failed(served, f.err)
		if served && time.Since(start) >= lived {
			retry.reset()
			continue
		}
		t := time.NewTimer(retry.delay())
		hint := l.retry
		if f.reachable {
			hint = nil // the server answers: trying sooner would only spin
		}
		select {
		case <-t.C:
		case <-hint:
			t.Stop()
		case <-l.ctx.Done():
			t.Stop()
			return
		}
	}
}

// retryNow ends the current backoff delay: the server is reachable again.
func (l *Listener) retryNow() {
	select {
	case l.retry <- struct{}{}:
	default:
	}
}

// session runs one connection from connect to loss; served says whether it
// got as far as serving.
func (l *Listener) session() (served bool, f failure) {
	conn, listening, f := l.connect()
	if f.err != nil {
		return false, f
	}
	defer l.hangUp(conn)
	l.runCallbacks(conn)
	l.setState(func(s *connState) { s.ready = true })
	return true, failure{err: l.serve(conn, listening), reachable: true}
}

// connect opens the connection and LISTENs on every subscribed channel and
// the health channel. It returns the set of channels listened.
func (l *Listener) connect() (*pgx.Conn, map[string]bool, failure) {
	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, l.config)
	if err != nil {
		return nil, nil, failure{err: fmt.Errorf("listener: connect: %w", err)}
	}
	l.mu.Lock()
	listening := map[string]bool{l.healthChannel: true}
	for ch := range l.subs {
		listening[ch] = true
	}
	l.pending = false
	l.presenceChanged = true
	l.mu.Unlock()
	if err := execListen(ctx, conn, "LISTEN", keys(listening)); err != nil {
		_ = conn.Close(context.Background())
		return nil, nil, failure{err: fmt.Errorf("listener: listen: %w", explainListenError(err)), reachable: true}
	}
	var id serverIdentity
	_ = conn.QueryRow(ctx, serverIdentitySQL).Scan(&id.database, &id.started, &id.recovery)
	select {
	case <-l.retry: // a hint from before this connect
	default:
	}
	l.setState(func(s *connState) {
		s.gen++
		s.up, s.tried, s.server, s.pid = true, true, id, conn.PgConn().PID()
		s.present, s.refused = nil, nil
	})
	l.connLog.connected(l.config.Host)
	return conn, listening, failure{}
}

// explainListenError says what a refused LISTEN most likely means.
func explainListenError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == sqlstateReadOnly {
		return fmt.Errorf("connected to a standby in recovery, where LISTEN is refused; "+
			"point the Listener at the primary (several hosts with target_session_attrs=read-write follow it): %w", err)
	}
	return err
}

// hangUp ends a connection: subscriptions wait for the next connect, and
// Subscribe calls waiting for a LISTEN return (it is issued on connect).
func (l *Listener) hangUp(conn *pgx.Conn) {
	l.setState(func(s *connState) { s.up, s.ready = false, false })
	l.mu.Lock()
	l.interrupt = nil
	l.mu.Unlock()
	l.release(nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = conn.Close(ctx)
	cancel()
}

// release returns to the Subscribe calls waiting for the channels in
// channels (all when channels is nil) the error failed gives their channel:
// nil means listening, or listening on the next connect. It is the one
// place waiters are released.
func (l *Listener) release(channels map[string]bool, failed map[string]error) {
	l.mu.Lock()
	var keep []*listenWaiter
	for _, w := range l.waiters {
		if channels != nil && !channels[w.channel] {
			keep = append(keep, w)
			continue
		}
		w.result <- failed[w.channel]
	}
	l.waiters = keep
	l.mu.Unlock()
}

func (l *Listener) runCallbacks(conn *pgx.Conn) {
	l.mu.Lock()
	callbacks := append([]*reconnectCallback(nil), l.callbacks...)
	l.mu.Unlock()
	for _, cb := range callbacks {
		func() {
			defer func() {
				if r := recover(); r != nil {
					l.log.Error("jobwatch: listener reconnect callback panicked", "panic", r)
				}
			}()
			if err := cb.fn(l.ctx, conn); err != nil && l.ctx.Err() == nil {
				l.log.Error("jobwatch: listener reconnect callback failed", "error", err)
			}
		}()
	}
}

// serve reads notifications until the connection fails or the Listener is
// closed, applying subscription changes and running the health check
// between reads.
func (l *Listener) serve(conn *pgx.Conn, listening map[string]bool) error {
	health := healthCheck{interval: l.opts.healthCheckInterval, next: time.Now().Add(l.opts.healthCheckInterval)}
	var wait context.Context
	stopWait := context.CancelFunc(func() {})
	defer func() { stopWait() }()
	for {
		if err := l.apply(conn, listening); err != nil {
			return err
		}
		if err := l.applyPresence(conn); err != nil {
			return err
		}
		if err := health.run(l.ctx, conn, l.healthChannel, l.opts.healthCheckTimeout, &l.stats); err != nil {
			return err
		}
		// One wait context serves notification after notification until
		// it ends: at the health check's deadline, or when Subscribe or
		// Unsubscribe interrupts it to have a change applied.
		if wait == nil || wait.Err() != nil {
			stopWait()
			if health.interval > 0 {
				wait, stopWait = context.WithDeadline(l.ctx, health.next)
			} else {
				wait, stopWait = context.WithCancel(l.ctx)
			}
			l.mu.Lock()
			l.interrupt = stopWait
			pending := l.pending
			l.mu.Unlock()
			if pending {
				continue
			}
		}
		n, err := conn.WaitForNotification(wait)
		if err != nil {
			if l.ctx.Err() != nil {
				return l.ctx.Err()
			}
			if wait.Err() != nil && !conn.IsClosed() {
				continue // interrupted on purpose: a change or the health check
			}
			return fmt.Errorf("listener: connection lost: %w", err)
		}
		if n.Channel == l.healthChannel {
			health.outstanding = false
			continue
		}
		l.dispatch(Notification{Channel: n.Channel, Payload: n.Payload})
	}
}

// apply LISTENs to newly subscribed channels and UNLISTENs those without
// subscribers, then releases the Subscribe calls waiting for them. A
// LISTEN the server refuses on a live connection fails those calls; a lost
// connection is returned.
func (l *Listener) apply(conn *pgx.Conn, listening map[string]bool) error {
	l.mu.Lock()
	if !l.pending {
		l.mu.Unlock()
		return nil
	}
	l.pending = false
	var listen, unlisten []string
	subscribed := make(map[string]bool, len(l.subs))
	for ch := range l.subs {
		subscribed[ch] = true
		if !listening[ch] {
			listen = append(listen, ch)
		}
	}
	for ch := range listening {
		if _, ok := l.subs[ch]; !ok && ch != l.healthChannel {
			unlisten = append(unlisten, ch)
		}
	}
	l.mu.Unlock()

	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	err := execListen(ctx, conn, "LISTEN", listen)
	if err == nil {
		err = execListen(ctx, conn, "UNLISTEN", unlisten)
	}
	if err != nil && conn.IsClosed() {
		return fmt.Errorf("listener: connection lost: %w", err)
	}
	// Every waiter of a subscribed channel is released: a channel
	// unsubscribed and subscribed again before this ran was never
	// UNLISTENed, and is listened already.
	var failed map[string]error
	for _, ch := range listen {
		if err != nil {
			if failed == nil {
				failed = map[string]error{}
			}
			failed[ch] = explainListenError(err)
		} else {
			listening[ch] = true
		}
	}
	if err == nil {
		for _, ch := range unlisten {
			delete(listening, ch)
		}
	}
	l.release(subscribed, failed)
	return nil
}

// execListen sends one simple-protocol query that LISTENs (or UNLISTENs)
// every channel.
func execListen(ctx context.Context, conn *pgx.Conn, verb string, channels []string) error {
	if len(channels) == 0 {
		return nil
	}
	var b strings.Builder
	for _, ch := range channels {
		b.WriteString(verb + " " + pgx.Identifier{ch}.Sanitize() + ";")
	}
	_, err := conn.Exec(ctx, b.String())
	return err
}

// dispatch hands n to every subscription of its channel without blocking.
func (l *Listener) dispatch(n Notification) {
	l.stats.notifications.Add(1)
	l.mu.Lock()
	for _, s := range l.subs[n.Channel] {
		s.enqueue(n)
	}
	l.mu.Unlock()
}

// connLog turns the loop's failures into few log lines, through a
// problemLog. A failed connect is an error, said once per kind while it
// lasts and again every connRemind; a lost connection a warning, said
// once, then again only with the count of losses every connRemind while
// they keep coming, so that a flapping connection does not log a line per
// drop. The first connect after a logged failure says so once.
type connLog struct {
	problems problemLog
	up       time.Time // when the current connection came up
	said     bool      // the reconnect after the line about a loss was logged
}

// connected records a successful connect.
func (c *connLog) connected(host string) {
	now := time.Now()
	c.up = now
	switch key, repeats, lastLine := c.problems.current(); key {
	case "":
	case "lost":
		if repeats == 0 && !c.said {
			c.problems.log.Info("jobwatch: listener reconnected", "host", host, "after", now.Sub(lastLine).Round(time.Millisecond))
			c.said = true
		}
	default:
		c.problems.clear("jobwatch: listener connected", "host", host)
	}
}

// failed records how a connection attempt or session ended.
func (c *connLog) failed(served bool, err error) {
	current, _, _ := c.problems.current()
	if served && current == "lost" && time.Since(c.up) >= connRemind {
		c.problems.forget() // it had been stable: this is a new problem
		current = ""
	}
	// The kind of failure, without what changes between attempts (a
	// network error's addresses and ephemeral port).
	key := err.Error()
	var pgErr *pgconn.PgError
	var opErr *net.OpError
	switch {
	case errors.As(err, &pgErr):
		key = pgErr.Code
	case errors.As(err, &opErr) && opErr.Err != nil:
		key = opErr.Op + ": " + opErr.Err.Error()
	}
	level, msg := slog.LevelError, "jobwatch: listener cannot connect, retrying"
	if served {
		key, level, msg = "lost", slog.LevelWarn, "jobwatch: listener connection lost, reconnecting"
		if current != "" && current != "lost" {
			key = current // a drop during an outage is part of it
		}
	}
	if c.problems.report(level, key, msg, "error", err) {
		c.said = false
	}
}

// healthCheck proves the connection alive: a NOTIFY to a private channel,
// sent over the connection itself, must come back before the next check.
type healthCheck struct {
	interval    time.Duration // 0: off
	next        time.Time
	outstanding bool
}

func (h *healthCheck) run(ctx context.Context, conn *pgx.Conn, channel string, timeout time.Duration, stats *listenerCounters) error {
	if h.interval <= 0 || time.Now().Before(h.next) {
		return nil
	}
	if h.outstanding {
		return errors.New("listener: health check: ping notification not received in time")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	_, err := conn.Exec(ctx, "SELECT pg_notify($1, '')", channel)
	cancel()
	stats.queries.Add(1)
	if err != nil {
		return fmt.Errorf("listener: health check: %w", err)
	}
	h.outstanding = true
	h.next = time.Now().Add(h.interval)
	return nil
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// serverIdentity is what a connection says of where it is.
type serverIdentity struct {
	database string
	started  string // pg_postmaster_start_time: differs between servers
	recovery bool
}

const serverIdentitySQL = `SELECT current_database(), pg_postmaster_start_time()::text, pg_is_in_recovery()`
