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
// connects on Start or the first Subscribe. When a connection that served
// for 5s or more is lost it retries at once, otherwise after a delay
// doubling from 0.5s to 60s; after
// every successful connect it replays every LISTEN and then runs the
// OnReconnect callbacks. It checks the connection end to end at an
// interval (see WithHealthCheck) and reconnects when the check fails.
//
// The goroutine reading the connection never runs subscriber code: each
// Subscription has its own goroutine and queue, so a slow or panicking
// callback delays only its own later notifications, and the server's
// notification queue is drained however slow the subscribers are.
//
// The connection must be a session: directly to PostgreSQL, or through a
// session-mode pooler. A Listener is safe for concurrent use. Close the
// watches that use it before it: a watch whose Listener is closed logs it
// once and polls at its fallback interval until it is closed itself.
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
	state     connState     // written by the connection loop only
	changed   chan struct{} // closed and replaced when state changes
	subs      map[string][]*Subscription
	waiters   []*listenWaiter // Subscribe calls waiting for their LISTEN
	pending   bool            // subs changed since the loop last applied them
	interrupt context.CancelFunc
	callbacks []*reconnectCallback
	presence  map[int32]int // keys to hold on the connection (see present), with their users
	// presenceChanged: presence changed, or a new connection holds none
	// yet, since the loop last applied it.
	presenceChanged bool
	started         bool
	closed          bool

	stats   listenerCounters
	connLog connLog // the connection loop's alone
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
	l, err := parseListener(connString, opts)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: %w", err)
	}
	return l, nil
}

// parseListener is NewListener, its errors without the package's prefix.
func parseListener(connString string, opts []Option) (*Listener, error) {
	// Parsed as a pool configuration so that the string given to pgxpool,
	// pool_* settings included, works here too.
	config, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("listener: parse connection string: %w", err)
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
	l, err := newListener(config.Copy(), opts)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: %w", err)
	}
	return l, nil
}

func newListener(config *pgx.ConnConfig, opts []Option) (*Listener, error) {
	o, err := buildOptions(scopeListener, opts)
	if err != nil {
		return nil, fmt.Errorf("listener: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var id [8]byte
	_, _ = rand.Read(id[:])
	return &Listener{
		config:        config,
		opts:          o,
		log:           o.logger.With("database", config.Database),
		connLog:       connLog{problems: problemLog{log: o.logger.With("database", config.Database), remind: connRemind}},
		healthChannel: "jobwatch_health_" + hex.EncodeToString(id[:]),
		ctx:           ctx,
		cancel:        cancel,
		done:          make(chan struct{}),
		retry:         make(chan struct{}, 1),
		changed:       make(chan struct{}),
		subs:          make(map[string][]*Subscription),
	}, nil
}

// Start connects the Listener, if it has not started yet, and waits for
// its first connection attempt, at most until ctx ends. It returns nil
// when the Listener is connected and listening and its OnReconnect
// callbacks have run on that connection, and otherwise the error
// of its last attempt: one that cannot connect, or whose LISTEN the server
// refuses (a standby), says why. Either way the Listener goes on trying
// in the background until Close. Start after Close returns
// ErrListenerClosed.
func (l *Listener) Start(ctx context.Context) error {
	if l == nil {
		return fmt.Errorf("jobwatch: listener: start: %w", ErrNilListener)
	}
	if err := l.start(ctx); err != nil {
		return fmt.Errorf("jobwatch: %w", err)
	}
	return nil
}

// start is Start with errors not yet prefixed.
func (l *Listener) start(ctx context.Context) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return fmt.Errorf("listener: start: %w", ErrListenerClosed)
	}
	if !l.started {
		l.started = true
		go l.run()
	}
	l.mu.Unlock()
	for {
		st, changed := l.connection()
		switch {
		case st.ready:
			return nil
		case st.tried && !st.up && st.err != nil:
			// A connection lost while its callbacks ran has its error
			// stored just after it is marked down: wait for it.
			return st.err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("listener: start: %w", ctx.Err())
		case <-l.done:
			return fmt.Errorf("listener: start: %w", ErrListenerClosed)
		}
	}
}

// Subscribe calls callback for every notification on channel, in the order
// received, on a goroutine of the subscription's own. The first Subscribe
// starts the connection and waits for its first attempt (see Start). When
// Subscribe returns nil and the Listener is connected, the channel is being
// listened to; when it is not connected, the LISTEN is issued as soon as
// it connects. When the server refuses the LISTEN, Subscribe returns its
// error and nothing is subscribed. A panic in callback is logged and the
// subscription goes on. While a callback runs, later notifications for it
// wait in its queue, which has no bound: nothing is dropped, and a
// callback that never returns holds them all.
func (l *Listener) Subscribe(channel string, callback func(Notification)) (*Subscription, error) {
	sub, err := l.subscribe(context.Background(), channel, callback)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: %w", err)
	}
	return sub, nil
}

// subscribe is Subscribe with errors not yet prefixed, waiting for the
// first connection attempt at most until ctx ends.
func (l *Listener) subscribe(ctx context.Context, channel string, callback func(Notification)) (*Subscription, error) {
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
		l.mu.Unlock()
		if err := l.start(ctx); errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			l.Unsubscribe(sub)
			return nil, fmt.Errorf("subscribe %q: %w", channel, err)
		}
		return sub, nil
	}
	var w *listenWaiter
	if !listened {
		l.pending = true
		if l.state.up {
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
			l.pending = true
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
// socket. An error or panic from callback is logged. AfterReconnect does
// the same and returns a function that removes the callback.
func (l *Listener) OnReconnect(callback func(ctx context.Context, conn *pgx.Conn) error) {
	l.AfterReconnect(callback)
}

// AfterReconnect is OnReconnect returning a function that removes the
// callback again; calling it more than once does nothing more.
func (l *Listener) AfterReconnect(callback func(ctx context.Context, conn *pgx.Conn) error) (remove func()) {
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
// is running is waited for, so do not call Close from one). Watches still
// using it are told: each logs it once and polls at its fallback interval
// (close them first). Subscribe and Start after Close return
// ErrListenerClosed. Close is idempotent.
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

// closing returns a channel closed when Close begins.
func (l *Listener) closing() <-chan struct{} { return l.ctx.Done() }

// isClosed reports whether Close has begun.
func (l *Listener) isClosed() bool { return l.ctx.Err() != nil }

// Stats returns the Listener's counters.
func (l *Listener) Stats() ListenerStats {
	s := l.stats.snapshot()
	st, _ := l.connection()
	s.Connected, s.Connects = st.up, st.gen
	if st.gen > 0 {
		s.Reconnects = st.gen - 1
	}
	if st.err != nil {
		s.LastError, s.LastErrorAt = st.err, st.errAt
	}
	l.mu.Lock()
	for _, list := range l.subs {
		s.Subscriptions += len(list)
	}
	l.mu.Unlock()
	return s
}
