package jobwatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Errors returned (wrapped) by Listener methods.
var (
	// ErrListenerClosed is returned by Subscribe after Close.
	ErrListenerClosed = errors.New("listener closed")
	// ErrNilListener is returned when a nil *Listener is passed.
	ErrNilListener = errors.New("nil listener")
)

// Reconnect backoff: the first retry after a lost connection is immediate,
// then the delay doubles from minBackoff up to maxBackoff.
const (
	minBackoff     = 500 * time.Millisecond
	maxBackoff     = 60 * time.Second
	connectTimeout = 10 * time.Second
)

// Notification is one NOTIFY received by a Listener.
type Notification struct {
	Channel string
	Payload string
}

// Listener owns one dedicated connection that LISTENs on any number of
// channels for any number of subscribers, like IHP's PGListener. It
// connects on the first Subscribe. When the connection is lost it retries
// at once, then with a delay doubling from 0.5s to 60s; after every
// successful connect it replays every LISTEN and then runs the OnReconnect
// callbacks. It checks the connection end to end at an interval (see
// WithHealthCheck) and reconnects when the check fails.
//
// The goroutine reading the connection never runs subscriber code: each
// Subscription has its own goroutine and queue, so a slow or panicking
// callback delays only its own later notifications, and the server's
// notification queue is drained however slow the subscribers are.
//
// The connection must be a session (not a transaction-pooled PgBouncer)
// connection. A Listener is safe for concurrent use.
type Listener struct {
	config *pgx.ConnConfig
	opts   options
	log    *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the connection loop has exited

	healthChannel string

	mu         sync.Mutex
	subs       map[string][]*Subscription
	listening  map[string]bool // channels LISTENed on the current connection
	dirty      bool            // subs changed since the last LISTEN/UNLISTEN pass
	waiters    []chan struct{} // Subscribe calls waiting for their LISTEN
	connected  bool
	cancelWait context.CancelFunc
	callbacks  []*reconnectCallback
	started    bool
	closed     bool
	firstTry   chan struct{} // closed after the first connection attempt

	stats listenerCounters
}

type reconnectCallback struct {
	fn func(ctx context.Context, conn *pgx.Conn) error
}

// NewListener parses connString (a URL or key=value DSN, as pgx reads it;
// pgxpool's pool_* settings are accepted and ignored) and returns a Listener that has not connected yet. It returns an error for
// a connection string that cannot be parsed.
func NewListener(connString string, opts ...Option) (*Listener, error) {
	// Parsed as a pool configuration so that the string given to pgxpool,
	// pool_* settings included, works here too.
	config, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: listener: parse connection string: %w", err)
	}
	return newListener(config.ConnConfig, opts...), nil
}

// NewListenerConfig is NewListener for an already parsed pgx configuration,
// for callers that set up TLS, a dialer or OnNotice in code. The config is
// copied.
func NewListenerConfig(config *pgx.ConnConfig, opts ...Option) (*Listener, error) {
	if config == nil {
		return nil, errors.New("jobwatch: listener: nil config")
	}
	return newListener(config.Copy(), opts...), nil
}

func newListener(config *pgx.ConnConfig, opts ...Option) *Listener {
	o := buildOptions(opts)
	ctx, cancel := context.WithCancel(context.Background())
	var id [8]byte
	_, _ = rand.Read(id[:])
	return &Listener{
		config:        config,
		opts:          o,
		log:           o.logger,
		ctx:           ctx,
		cancel:        cancel,
		done:          make(chan struct{}),
		healthChannel: "jobwatch_health_" + hex.EncodeToString(id[:]),
		subs:          make(map[string][]*Subscription),
		listening:     make(map[string]bool),
		firstTry:      make(chan struct{}),
	}
}

// Subscription is one callback subscribed to one channel of a Listener.
type Subscription struct {
	channel  string
	callback func(Notification)
	log      *slog.Logger

	mu      sync.Mutex
	queue   []Notification
	stopped bool
	signal  chan struct{} // buffered(1): the queue has something
	done    chan struct{} // closed when the delivery goroutine exits
}

// Channel returns the channel the subscription listens on.
func (s *Subscription) Channel() string { return s.channel }

func (s *Subscription) enqueue(n Notification) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return
	}
	s.queue = append(s.queue, n)
	s.mu.Unlock()
	select {
	case s.signal <- struct{}{}:
	default:
	}
}

func (s *Subscription) stop() {
	s.mu.Lock()
	s.stopped = true
	s.queue = nil
	s.mu.Unlock()
	select {
	case s.signal <- struct{}{}:
	default:
	}
}

// deliver runs the callback for each queued notification, in order.
func (s *Subscription) deliver() {
	defer close(s.done)
	var batch []Notification
	for range s.signal {
		for {
			s.mu.Lock()
			if s.stopped {
				s.mu.Unlock()
				return
			}
			batch, s.queue = s.queue, batch[:0]
			s.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			for _, n := range batch {
				s.call(n)
				if s.isStopped() {
					return
				}
			}
		}
	}
}

func (s *Subscription) isStopped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopped
}

func (s *Subscription) call(n Notification) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("jobwatch: listener callback panicked", "channel", s.channel, "panic", r)
		}
	}()
	s.callback(n)
}

// Subscribe calls callback for every notification on channel, in the order
// received, on a goroutine of the subscription's own. The first Subscribe
// starts the connection and waits for its first attempt. When Subscribe
// returns and the Listener is connected, the channel is being listened to;
// when it is not connected, the LISTEN is issued as soon as it connects.
// A panic in callback is logged and the subscription goes on. While a
// callback runs, later notifications for it wait in its queue, which has no
// bound: nothing is dropped, and a callback that never returns holds them
// all.
func (l *Listener) Subscribe(channel string, callback func(Notification)) (*Subscription, error) {
	if l == nil {
		return nil, fmt.Errorf("jobwatch: subscribe: %w", ErrNilListener)
	}
	if channel == "" {
		return nil, errors.New("jobwatch: subscribe: empty channel name")
	}
	if len(channel) > maxIdentifierLen {
		return nil, fmt.Errorf("jobwatch: subscribe %q: channel name longer than %d bytes", channel, maxIdentifierLen)
	}
	if callback == nil {
		return nil, fmt.Errorf("jobwatch: subscribe %q: nil callback", channel)
	}
	sub := &Subscription{
		channel:  channel,
		callback: callback,
		log:      l.log,
		signal:   make(chan struct{}, 1),
		done:     make(chan struct{}),
	}

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, fmt.Errorf("jobwatch: subscribe %q: %w", channel, ErrListenerClosed)
	}
	go sub.deliver()
	l.subs[channel] = append(l.subs[channel], sub)
	if !l.started {
		l.started = true
		l.mu.Unlock()
		go l.run()
		select {
		case <-l.firstTry:
		case <-l.done:
		}
		return sub, nil
	}
	var wait chan struct{}
	if !l.listening[channel] {
		l.dirty = true
		if l.connected {
			wait = make(chan struct{})
			l.waiters = append(l.waiters, wait)
		}
		if l.cancelWait != nil {
			l.cancelWait()
		}
	}
	l.mu.Unlock()
	if wait != nil {
		select {
		case <-wait:
		case <-l.done:
		}
	}
	return sub, nil
}

// Unsubscribe stops delivery to sub: once it returns, sub's callback is not
// called again (unless it is running right now, from its own goroutine).
// When the channel has no subscriber left the Listener UNLISTENs it.
// Unsubscribing twice, or a nil sub, does nothing.
func (l *Listener) Unsubscribe(sub *Subscription) {
	if l == nil || sub == nil {
		return
	}
	l.mu.Lock()
	list := l.subs[sub.channel]
	for i, s := range list {
		if s == sub {
			list = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(l.subs, sub.channel)
		if l.listening[sub.channel] {
			l.dirty = true
			if l.cancelWait != nil {
				l.cancelWait()
			}
		}
	} else {
		l.subs[sub.channel] = list
	}
	l.mu.Unlock()
	sub.stop()
}

// OnReconnect registers callback to run after every successful connect
// (the first one included, as in IHP), once every LISTEN has been issued,
// with the live connection. It runs on the Listener's connection goroutine,
// so it should be quick; notifications that arrive meanwhile wait in the
// socket. An error or panic from callback is logged.
func (l *Listener) OnReconnect(callback func(ctx context.Context, conn *pgx.Conn) error) {
	l.addReconnect(callback)
}

// addReconnect is OnReconnect returning a function that removes the
// callback again.
func (l *Listener) addReconnect(callback func(ctx context.Context, conn *pgx.Conn) error) (remove func()) {
	if l == nil || callback == nil {
		return func() {}
	}
	cb := &reconnectCallback{fn: callback}
	l.mu.Lock()
	l.callbacks = append(l.callbacks, cb)
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for i, c := range l.callbacks {
			if c == cb {
				l.callbacks = append(l.callbacks[:i:i], l.callbacks[i+1:]...)
				return
			}
		}
	}
}

// Close stops the Listener: it closes the connection, stops every
// subscription's goroutine and waits for them all to exit (a callback that
// is running is waited for, so do not call Close from one). Subscribe after
// Close returns ErrListenerClosed. Close is idempotent.
func (l *Listener) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		<-l.done
		return nil
	}
	l.closed = true
	started := l.started
	var subs []*Subscription
	for _, list := range l.subs {
		subs = append(subs, list...)
	}
	l.subs = map[string][]*Subscription{}
	l.mu.Unlock()

	l.cancel()
	if started {
		<-l.done
	} else {
		close(l.done)
	}
	for _, s := range subs {
		s.stop()
		<-s.done
	}
	return nil
}

// run is the connection loop: connect, serve until the connection fails,
// back off, repeat until Close. After a connection that was up is lost the
// first retry is immediate; each failed attempt after that doubles the
// delay from minBackoff to maxBackoff.
func (l *Listener) run() {
	defer close(l.done)
	failures := 0
	first := true
	for {
		served, err := l.connectAndServe(&first)
		if l.ctx.Err() != nil {
			return
		}
		l.stats.setError(err)
		if served {
			failures = 0
		}
		l.log.Error("jobwatch: listener connection failed", "error", err, "retry", failures+1)
		if failures > 0 {
			delay := maxBackoff
			if failures < 8 {
				delay = min(minBackoff<<(failures-1), maxBackoff)
			}
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.ctx.Done():
				t.Stop()
				return
			}
		}
		failures++
	}
}

// connectAndServe runs one connection from connect to failure; served says
// whether it got as far as serving notifications.
func (l *Listener) connectAndServe(first *bool) (served bool, err error) {
	conn, err := l.connect()
	if *first {
		*first = false
		close(l.firstTry)
	}
	if err != nil {
		return false, err
	}
	defer func() {
		l.mu.Lock()
		l.connected = false
		l.listening = make(map[string]bool)
		for _, w := range l.waiters {
			close(w)
		}
		l.waiters = nil
		l.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = conn.Close(ctx)
		cancel()
	}()
	return true, l.serve(conn)
}

// connect opens the connection, LISTENs on every subscribed channel and runs
// the OnReconnect callbacks.
func (l *Listener) connect() (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, l.config)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: listener: connect: %w", err)
	}
	l.mu.Lock()
	channels := make([]string, 0, len(l.subs)+1)
	channels = append(channels, l.healthChannel)
	for ch := range l.subs {
		channels = append(channels, ch)
	}
	l.dirty = false
	waiters := l.waiters
	l.waiters = nil
	l.mu.Unlock()

	if err := execListen(ctx, conn, "LISTEN", channels); err != nil {
		_ = conn.Close(context.Background())
		return nil, fmt.Errorf("jobwatch: listener: listen: %w", err)
	}
	l.mu.Lock()
	for _, ch := range channels {
		l.listening[ch] = true
	}
	l.connected = true
	callbacks := append([]*reconnectCallback(nil), l.callbacks...)
	l.mu.Unlock()
	for _, w := range waiters {
		close(w)
	}
	l.stats.connects.Add(1)
	l.stats.connected.Store(true)

	for _, cb := range callbacks {
		l.runCallback(cb, conn)
	}
	return conn, nil
}

func (l *Listener) runCallback(cb *reconnectCallback, conn *pgx.Conn) {
	defer func() {
		if r := recover(); r != nil {
			l.log.Error("jobwatch: listener reconnect callback panicked", "panic", r)
		}
	}()
	if err := cb.fn(l.ctx, conn); err != nil && l.ctx.Err() == nil {
		l.log.Error("jobwatch: listener reconnect callback failed", "error", err)
	}
}

// execListen sends one simple-protocol query that LISTENs (or UNLISTENs)
// every channel.
func execListen(ctx context.Context, conn *pgx.Conn, verb string, channels []string) error {
	if len(channels) == 0 {
		return nil
	}
	var b strings.Builder
	for _, ch := range channels {
		b.WriteString(verb)
		b.WriteByte(' ')
		b.WriteString(pgx.Identifier{ch}.Sanitize())
		b.WriteString(";")
	}
	_, err := conn.Exec(ctx, b.String())
	return err
}

// serve reads notifications until the connection fails or the Listener is
// closed. It applies LISTEN/UNLISTEN changes between reads and runs the
// health check when it is due.
func (l *Listener) serve(conn *pgx.Conn) error {
	defer l.stats.connected.Store(false)
	interval := l.opts.healthCheckInterval
	nextCheck := time.Now().Add(interval)
	pingOutstanding := false
	var waitCtx context.Context
	cancelWait := context.CancelFunc(func() {})
	defer func() {
		l.mu.Lock()
		l.cancelWait = nil
		l.mu.Unlock()
		cancelWait()
	}()
	for {
		if err := l.applyChanges(conn); err != nil {
			return fmt.Errorf("jobwatch: listener: connection lost: %w", err)
		}
		if interval > 0 && !time.Now().Before(nextCheck) {
			if pingOutstanding {
				return errors.New("jobwatch: listener: health check: ping notification not received in time")
			}
			ctx, cancel := context.WithTimeout(l.ctx, l.opts.healthCheckTimeout)
			_, err := conn.Exec(ctx, "SELECT pg_notify($1, '')", l.healthChannel)
			cancel()
			if err != nil {
				if l.ctx.Err() != nil {
					return l.ctx.Err()
				}
				return fmt.Errorf("jobwatch: listener: health check: %w", err)
			}
			pingOutstanding = true
			nextCheck = time.Now().Add(interval)
		}

		l.mu.Lock()
		if l.dirty || len(l.waiters) > 0 {
			l.mu.Unlock()
			continue
		}
		// One wait context serves notification after notification until it
		// ends: at the health check's deadline, or when Subscribe or
		// Unsubscribe cancels it to have a LISTEN change applied.
		if waitCtx == nil || waitCtx.Err() != nil {
			cancelWait()
			if interval > 0 {
				waitCtx, cancelWait = context.WithDeadline(l.ctx, nextCheck)
			} else {
				waitCtx, cancelWait = context.WithCancel(l.ctx)
			}
			l.cancelWait = cancelWait
		}
		l.mu.Unlock()

		n, err := conn.WaitForNotification(waitCtx)
		if err != nil {
			if l.ctx.Err() != nil {
				return l.ctx.Err()
			}
			if waitCtx.Err() != nil && !conn.IsClosed() {
				continue // interrupted on purpose: a LISTEN change or a health check
			}
			return fmt.Errorf("jobwatch: listener: connection lost: %w", err)
		}
		if n.Channel == l.healthChannel {
			pingOutstanding = false
			continue
		}
		l.dispatch(Notification{Channel: n.Channel, Payload: n.Payload})
	}
}

// applyChanges LISTENs to newly subscribed channels and UNLISTENs those
// without subscribers, then releases the Subscribe calls waiting for it.
func (l *Listener) applyChanges(conn *pgx.Conn) error {
	l.mu.Lock()
	if !l.dirty && len(l.waiters) == 0 {
		l.mu.Unlock()
		return nil
	}
	var listen, unlisten []string
	for ch := range l.subs {
		if !l.listening[ch] {
			listen = append(listen, ch)
		}
	}
	for ch := range l.listening {
		if _, ok := l.subs[ch]; !ok && ch != l.healthChannel {
			unlisten = append(unlisten, ch)
		}
	}
	l.dirty = false
	waiters := l.waiters
	l.waiters = nil
	l.mu.Unlock()

	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	err := execListen(ctx, conn, "LISTEN", listen)
	if err == nil {
		err = execListen(ctx, conn, "UNLISTEN", unlisten)
	}
	if err == nil {
		l.mu.Lock()
		for _, ch := range listen {
			l.listening[ch] = true
		}
		for _, ch := range unlisten {
			delete(l.listening, ch)
		}
		l.mu.Unlock()
	}
	for _, w := range waiters {
		close(w)
	}
	return err
}

// dispatch hands n to every subscription of its channel without blocking.
func (l *Listener) dispatch(n Notification) {
	l.stats.notifications.Add(1)
	l.mu.Lock()
	subs := l.subs[n.Channel]
	for _, s := range subs {
		s.enqueue(n)
	}
	l.mu.Unlock()
}

// ListenerStats is a snapshot of a Listener's counters, for metrics.
type ListenerStats struct {
	Connected     bool      // a connection is up and listening
	Connects      uint64    // successful connects, the first included
	Reconnects    uint64    // successful connects after the first
	Notifications uint64    // notifications received for subscribed channels
	Subscriptions int       // subscriptions active now
	LastError     error     // the last connection error, nil if none
	LastErrorAt   time.Time // when LastError happened
}

type listenerCounters struct {
	connected     atomic.Bool
	connects      atomic.Uint64
	notifications atomic.Uint64
	lastErr       atomic.Pointer[timedError]
}

type timedError struct {
	err error
	at  time.Time
}

func (c *listenerCounters) setError(err error) {
	if err != nil {
		c.lastErr.Store(&timedError{err: err, at: time.Now()})
	}
}

// Stats returns the Listener's counters.
func (l *Listener) Stats() ListenerStats {
	s := ListenerStats{
		Connected:     l.stats.connected.Load(),
		Connects:      l.stats.connects.Load(),
		Notifications: l.stats.notifications.Load(),
	}
	l.mu.Lock()
	for _, list := range l.subs {
		s.Subscriptions += len(list)
	}
	l.mu.Unlock()
	if s.Connects > 0 {
		s.Reconnects = s.Connects - 1
	}
	if e := l.stats.lastErr.Load(); e != nil {
		s.LastError, s.LastErrorAt = e.err, e.at
	}
	return s
}
