package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The Listener's connection loop. One goroutine runs it and is the only one
// that touches the connection:
//
//	connect ──► LISTEN every channel ──► OnReconnect callbacks ──► serve
//	   ▲                                                              │
//	   └──── back off: none after a connection that lived, else ◄─────┘
//	         0.5s doubling to 60s, cut short by retryNow
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
	// connRemind is how often a connection failure that lasts is logged
	// again.
	connRemind = 5 * time.Minute
)

// run is the connection loop; it returns when Close cancels l.ctx.
func (l *Listener) run() {
	defer close(l.done)
	retry := backoff{min: minBackoff, max: maxBackoff}
	first := true
	for {
		start := time.Now()
		served, err := l.session(first)
		first = false
		if l.ctx.Err() != nil {
			return
		}
		l.stats.setError(err)
		l.reportConnError(served, err)
		if served && time.Since(start) >= lived {
			retry.reset()
			continue
		}
		t := time.NewTimer(retry.delay())
		select {
		case <-t.C:
		case <-l.retry:
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
// got as far as serving. After the first attempt, failed or not, it
// releases the first Subscribe.
func (l *Listener) session(first bool) (served bool, err error) {
	conn, listening, err := l.connect()
	if err != nil {
		if first {
			l.stats.setError(err) // before the first Subscribe returns and looks
			close(l.firstTry)
		}
		return false, err
	}
	defer l.hangUp(conn)
	l.runCallbacks(conn)
	if first {
		close(l.firstTry)
	}
	return true, l.serve(conn, listening)
}

// connect opens the connection and LISTENs on every subscribed channel and
// the health channel. It returns the set of channels listened.
func (l *Listener) connect() (*pgx.Conn, map[string]bool, error) {
	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, l.config)
	if err != nil {
		return nil, nil, fmt.Errorf("listener: connect: %w", err)
	}
	l.mu.Lock()
	listening := map[string]bool{l.healthChannel: true}
	for ch := range l.subs {
		listening[ch] = true
	}
	l.changed = false
	l.mu.Unlock()
	if err := execListen(ctx, conn, "LISTEN", keys(listening)); err != nil {
		_ = conn.Close(context.Background())
		return nil, nil, fmt.Errorf("listener: listen: %w", explainListenError(err))
	}
	var id serverIdentity
	_ = conn.QueryRow(ctx, serverIdentitySQL).Scan(&id.database, &id.started, &id.recovery)
	l.mu.Lock()
	l.connected = true
	l.server = id
	l.mu.Unlock()
	select {
	case <-l.retry: // a hint from before this connect
	default:
	}
	l.stats.connects.Add(1)
	l.stats.connected.Store(true)
	l.problems.clear("jobwatch: listener connected", "host", l.config.Host)
	return conn, listening, nil
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
	l.stats.connected.Store(false)
	l.mu.Lock()
	l.connected = false
	l.interrupt = nil
	for _, c := range l.checks {
		c.connectionLost()
	}
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
		if err := health.run(l.ctx, conn, l.healthChannel, l.opts.healthCheckTimeout); err != nil {
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
			pending := l.changed
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
			if token, ok := strings.CutPrefix(n.Payload, probePrefix); ok {
				l.probeArrived(token)
			} else {
				health.outstanding = false
			}
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
	if !l.changed {
		l.mu.Unlock()
		return nil
	}
	l.changed = false
	var listen, unlisten []string
	for ch := range l.subs {
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
	asked := make(map[string]bool, len(listen))
	var failed map[string]error
	for _, ch := range listen {
		asked[ch] = true
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
	l.release(asked, failed)
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

// reportConnError logs a lost connection (a warning: the loop reconnects)
// or a failed connect (an error), once per kind of failure while it
// lasts.
func (l *Listener) reportConnError(served bool, err error) {
	key := err.Error()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		key = pgErr.Code
	}
	if served {
		l.problems.report(slog.LevelWarn, "lost "+key, "jobwatch: listener connection lost, reconnecting", "error", err)
		return
	}
	l.problems.report(slog.LevelError, key, "jobwatch: listener cannot connect, retrying", "error", err)
}

// healthCheck proves the connection alive: a NOTIFY to a private channel,
// sent over the connection itself, must come back before the next check.
type healthCheck struct {
	interval    time.Duration // 0: off
	next        time.Time
	outstanding bool
}

func (h *healthCheck) run(ctx context.Context, conn *pgx.Conn, channel string, timeout time.Duration) error {
	if h.interval <= 0 || time.Now().Before(h.next) {
		return nil
	}
	if h.outstanding {
		return errors.New("listener: health check: ping notification not received in time")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	_, err := conn.Exec(ctx, "SELECT pg_notify($1, '')", channel)
	cancel()
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
