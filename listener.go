package jobwatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
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
// The connection must be a session: directly to PostgreSQL, or through a
// session-mode pooler. A Listener is safe for concurrent use.
type Listener struct {
	config        *pgx.ConnConfig
	opts          options
	log           *slog.Logger
	healthChannel string

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the connection loop has exited
	retry  chan struct{} // buffered(1): end the backoff now

	mu        sync.Mutex
	subs      map[string][]*Subscription
	waiters   []*listenWaiter // Subscribe calls waiting for their LISTEN
	changed   bool            // subs changed since the loop last applied them
	interrupt context.CancelFunc
	connected bool
	callbacks []*reconnectCallback
	started   bool
	closed    bool
	firstTry  chan struct{} // closed after the first connection attempt

	probes map[string]chan struct{}         // delivery check tokens awaited
	checks map[*pgxpool.Pool]*deliveryCheck // one per pool the watches use
	server serverIdentity                   // what the connection said at connect

	stats    listenerCounters
	problems problemLog
}

type reconnectCallback struct {
	fn func(ctx context.Context, conn *pgx.Conn) error
}

// listenWaiter is a Subscribe call waiting for the LISTEN of its channel.
type listenWaiter struct {
	channel string
	result  chan error // buffered(1); nil: listening, or not connected (LISTEN on connect)
}

// NewListener parses connString (a URL or key=value DSN, as pgx reads it;
// pgxpool's pool_* settings are accepted and ignored) and returns a
// Listener that has not connected yet. It returns an error for a
// connection string that cannot be parsed, and one wrapping
// ErrInvalidOption for an option that does not apply to a Listener.
func NewListener(connString string, opts ...Option) (*Listener, error) {
	// Parsed as a pool configuration so that the string given to pgxpool,
	// pool_* settings included, works here too.
	config, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: listener: parse connection string: %w", err)
	}
	return newListener(config.ConnConfig, opts)
}

// NewListenerConfig is NewListener for an already parsed pgx configuration,
// for callers that set up TLS, a dialer or OnNotice in code. The config is
// copied.
func NewListenerConfig(config *pgx.ConnConfig, opts ...Option) (*Listener, error) {
	if config == nil {
		return nil, errors.New("jobwatch: listener: nil config")
	}
	return newListener(config.Copy(), opts)
}

func newListener(config *pgx.ConnConfig, opts []Option) (*Listener, error) {
	o, err := buildOptions(scopeListener, opts)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: listener: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var id [8]byte
	_, _ = rand.Read(id[:])
	return &Listener{
		config:        config,
		opts:          o,
		log:           o.logger,
		healthChannel: "jobwatch_health_" + hex.EncodeToString(id[:]),
		ctx:           ctx,
		cancel:        cancel,
		done:          make(chan struct{}),
		retry:         make(chan struct{}, 1),
		subs:          make(map[string][]*Subscription),
		firstTry:      make(chan struct{}),
		probes:        make(map[string]chan struct{}),
		checks:        make(map[*pgxpool.Pool]*deliveryCheck),
		problems:      problemLog{log: o.logger, remind: connRemind},
	}, nil
}

// Subscribe calls callback for every notification on channel, in the order
// received, on a goroutine of the subscription's own. The first Subscribe
// starts the connection and waits for its first attempt. When Subscribe
// returns nil and the Listener is connected, the channel is being listened
// to; when it is not connected, the LISTEN is issued as soon as it
// connects. When the server refuses the LISTEN, Subscribe returns its
// error and nothing is subscribed. A panic in callback is logged and the
// subscription goes on. While a callback runs, later notifications for it
// wait in its queue, which has no bound: nothing is dropped, and a
// callback that never returns holds them all.
func (l *Listener) Subscribe(channel string, callback func(Notification)) (*Subscription, error) {
	sub, err := l.subscribe(channel, callback)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: %w", err)
	}
	return sub, nil
}

// subscribe is Subscribe with errors not yet prefixed.
func (l *Listener) subscribe(channel string, callback func(Notification)) (*Subscription, error) {
	switch {
	case l == nil:
		return nil, fmt.Errorf("subscribe %q: %w", channel, ErrNilListener)
	case channel == "":
		return nil, errors.New("subscribe: empty channel name")
	case len(channel) > maxIdentifierLen:
		return nil, fmt.Errorf("subscribe %q: channel name longer than %d bytes", channel, maxIdentifierLen)
	case callback == nil:
		return nil, fmt.Errorf("subscribe %q: nil callback", channel)
	}

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, fmt.Errorf("subscribe %q: %w", channel, ErrListenerClosed)
	}
	sub := newSubscription(channel, callback, l.log)
	_, listened := l.subs[channel]
	l.subs[channel] = append(l.subs[channel], sub)
	if !l.started {
		// The first Subscribe starts the loop and waits for its first
		// attempt, whose connect LISTENs every channel.
		l.started = true
		l.mu.Unlock()
		go l.run()
		select {
		case <-l.firstTry:
		case <-l.done:
		}
		return sub, nil
	}
	var w *listenWaiter
	if !listened {
		l.changed = true
		if l.connected {
			w = &listenWaiter{channel: channel, result: make(chan error, 1)}
			l.waiters = append(l.waiters, w)
		}
		l.wakeLoop()
	}
	l.mu.Unlock()
	if w == nil {
		return sub, nil
	}
	var err error
	select {
	case err = <-w.result:
	case <-l.done:
	}
	if err != nil {
		l.Unsubscribe(sub)
		return nil, fmt.Errorf("subscribe %q: %w", channel, err)
	}
	return sub, nil
}

// wakeLoop interrupts the loop's wait for a notification so that it applies
// the changed subscriptions. l.mu is held.
func (l *Listener) wakeLoop() {
	if l.interrupt != nil {
		l.interrupt()
	}
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
		if _, ok := l.subs[sub.channel]; ok {
			delete(l.subs, sub.channel)
			l.changed = true
			l.wakeLoop()
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
	var checks []*deliveryCheck
	for _, c := range l.checks {
		checks = append(checks, c)
	}
	l.mu.Unlock()

	l.cancel()
	if started {
		<-l.done
	} else {
		close(l.done)
	}
	for _, c := range checks {
		<-c.done
	}
	for _, s := range subs {
		s.stop()
		<-s.done
	}
	return nil
}

// Stats returns the Listener's counters.
func (l *Listener) Stats() ListenerStats {
	s := l.stats.snapshot()
	l.mu.Lock()
	for _, list := range l.subs {
		s.Subscriptions += len(list)
	}
	l.mu.Unlock()
	return s
}
