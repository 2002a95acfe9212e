package jobwatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The delivery check proves, end to end, that a NOTIFY sent the way
// producers send theirs (through the watch's pool, committed on the server)
// reaches the Listener. The Listener's own health check cannot: through a
// pooler in transaction mode its NOTIFY and its LISTEN share a server
// connection, and a Listener on another database than the pool hears
// itself perfectly well. Without this check both cases look healthy while
// every job waits for the poll interval.
//
// One check runs per Listener and pool, however many watches share them:
// every interval it sends a probe, "probe:<token>" on the Listener's private
// channel, through the pool, and waits up to timeout for it. A probe lost
// while the Listener reconnected proves nothing; two lost in a row, the
// second sent a second after the first, mean notifications do not arrive.
// It then logs one error naming the likely cause, with what it found of
// both connections, and the watches poll every WithFallbackPollInterval
// until a probe arrives again, which is logged once too. A Listener that
// cannot connect hears nothing either: when it has been down for as long
// as a failed check takes, without a break, the watches poll around it.

// probePrefix starts the payload of a probe.
const probePrefix = "probe:"

// deliveryRemind is how often a delivery failure that lasts is logged
// again.
const deliveryRemind = 5 * time.Minute

// deliveryRetry is how soon a lost probe is followed by a second one.
const deliveryRetry = time.Second

// poolGroup is what a Listener keeps for one pool its watches use: the
// watches, whether notifications reach them (the delivery check's
// finding, the one place that state lives), and the checks run for them.
type poolGroup struct {
	l        *Listener
	pool     *pgxpool.Pool
	problems problemLog
	delivery *deliveryCheck // nil with the check off
	gate     *gateCheck     // started by the first watch that follows a gate

	mu        sync.Mutex
	watches   map[*Watch]bool
	working   bool
	changedAt time.Time
}

// join adds w to the group of l and pool, starting it if w is the first,
// and returns it; nil once the Listener is closed.
func (l *Listener) join(pool *pgxpool.Pool, w *Watch) *poolGroup {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	g := l.groups[pool]
	if g == nil {
		g = &poolGroup{
			l: l, pool: pool, problems: problemLog{log: l.log, remind: deliveryRemind},
			watches: map[*Watch]bool{}, working: true, changedAt: time.Now(),
		}
		if l.opts.deliveryInterval > 0 {
			g.delivery = startDeliveryCheck(l.ctx, l, g)
		}
		l.groups[pool] = g
	}
	if g.gate == nil && w.poller.followsGate() {
		g.gate = startGateCheck(l.ctx, l, g)
	}
	g.mu.Lock()
	g.watches[w] = true
	g.mu.Unlock()
	return g
}

// members returns the group's watches.
func (g *poolGroup) members() []*Watch {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]*Watch, 0, len(g.watches))
	for w := range g.watches {
		out = append(out, w)
	}
	return out
}

// leave removes w; the last watch to leave stops the group's checks.
func (g *poolGroup) leave(w *Watch) {
	if g == nil {
		return
	}
	l := g.l
	l.mu.Lock()
	g.mu.Lock()
	delete(g.watches, w)
	last := len(g.watches) == 0
	g.mu.Unlock()
	if last && l.groups[g.pool] == g {
		delete(l.groups, g.pool)
	}
	l.mu.Unlock()
	if last {
		g.delivery.stop()
		g.gate.stop()
	}
}

// state returns whether notifications arrive and since when that holds.
// A watch reads it whenever its poller plans, so no change is ever lost.
func (g *poolGroup) state() (bool, time.Time) {
	if g == nil {
		return false, time.Time{}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.working, g.changedAt
}

// set records whether notifications arrive and, on a change, logs it once
// and has every watch's poller plan again. The line is logged first, so
// that whoever sees the new state finds it logged; the watches are told
// after the state is stored, and each reads it when it plans, so that a
// watch joining meanwhile cannot keep the old one.
func (g *poolGroup) set(working bool, cause string) {
	if working {
		g.problems.clear("jobwatch: notifications arrive again; polling at the normal interval")
	} else {
		g.problems.report(slog.LevelError, cause,
			"jobwatch: notifications do not reach the Listener: jobs are found by polling every fallback interval until they do",
			"cause", cause, "fallback_poll", fallbackOf(g.members()))
	}
	g.mu.Lock()
	changed := g.working != working
	if changed {
		g.working, g.changedAt = working, time.Now()
	}
	g.mu.Unlock()
	if changed {
		for _, w := range g.members() {
			w.poller.signal()
		}
	}
}

// connectionLost is called by the Listener when its connection goes.
func (g *poolGroup) connectionLost() { g.delivery.nudge() }

// listenerClosed is called by Close while watches still use the Listener:
// nothing will reach them any more.
func (g *poolGroup) listenerClosed() {
	g.set(false, "the Listener was closed while watches still use it (close the watches first)")
}

func fallbackOf(watches []*Watch) time.Duration {
	if len(watches) == 0 {
		return defaultFallbackPoll
	}
	return watches[0].fallback
}

// probeTarget is what the delivery check needs of its Listener.
type probeTarget interface {
	connection() (connState, <-chan struct{})
	probeChannel() string
	expectProbe(token string) <-chan struct{}
	forgetProbe(token string)
	retryNow()
}

// deliveryCheck is the check for one Listener and pool.
type deliveryCheck struct {
	target         probeTarget
	pool           *pgxpool.Pool
	group          *poolGroup
	interval, wait time.Duration
	probes         func(sent bool, queueUsage float64) // a probe tried; when sent, the queue usage it read
	arrived        func(roundTrip time.Duration)
	lostOnes       func()
	cancel         context.CancelFunc
	done           chan struct{}
	nudges         chan struct{} // buffered(1): the Listener lost its connection
}

func startDeliveryCheck(ctx context.Context, l *Listener, g *poolGroup) *deliveryCheck {
	ctx, cancel := context.WithCancel(ctx)
	c := &deliveryCheck{
		target: l, pool: g.pool, group: g,
		interval: l.opts.deliveryInterval, wait: l.opts.deliveryTimeout,
		probes: func(sent bool, usage float64) {
			l.stats.probes.Add(1)
			l.stats.queries.Add(1)
			if sent {
				l.stats.queueUsage.Store(math.Float64bits(usage))
			}
		},
		arrived:  func(d time.Duration) { l.stats.roundTrip.Store(int64(d)) },
		lostOnes: func() { l.stats.probesLost.Add(1) },
		cancel:   cancel, done: make(chan struct{}), nudges: make(chan struct{}, 1),
	}
	go c.run(ctx)
	return c
}

func (c *deliveryCheck) stop() {
	if c != nil {
		c.cancel()
		<-c.done
	}
}

// nudge makes the check look now whether the pool reaches a server.
func (c *deliveryCheck) nudge() {
	if c == nil {
		return
	}
	select {
	case c.nudges <- struct{}{}:
	default:
	}
}

func (c *deliveryCheck) run(ctx context.Context) {
	defer close(c.done)
	next := time.Duration(0) // the first probe as soon as the Listener is connected
	lost := 0
	var down time.Time // since when the Listener has been down without a break
	for {
		t := time.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-c.nudges:
			t.Stop()
		}
		next = c.interval
		outcome, cause := c.probe(ctx)
		if st, _ := c.target.connection(); st.up {
			down = time.Time{} // a blip that is over is no outage
		} else if down.IsZero() {
			down = time.Now()
		}
		switch outcome {
		case probeArrived:
			lost = 0
			c.group.set(true, "")
		case probeLost:
			lost++
			if lost == 1 {
				next = deliveryRetry // a second probe before saying anything
			} else {
				c.group.set(false, cause)
			}
		case probeInconclusive:
			if down.IsZero() {
				break
			}
			if time.Since(down) >= c.interval+c.wait {
				st, _ := c.target.connection()
				c.group.set(false, "the Listener is not connected: "+errorText(st.err))
			}
			next = deliveryRetry
		}
	}
}

func errorText(err error) string {
	if err == nil {
		return "not connected yet"
	}
	return err.Error()
}

type probeOutcome int

const (
	probeInconclusive probeOutcome = iota // the Listener reconnected, the pool failed: proves nothing
	probeArrived
	probeLost
)

// probe sends one probe through the pool and waits for the Listener to
// receive it. For a lost probe it says the likely cause.
func (c *deliveryCheck) probe(ctx context.Context) (probeOutcome, string) {
	before, _ := c.target.connection()
	if !before.up {
		// While the Listener retries on its backoff, a pool that reaches a
		// server again (after a failover, a restart) means it should try
		// now rather than at the end of a delay that grew with the outage.
		// Queries are never cut short by stop: pgx would discard the
		// pool's connection.
		pingCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.wait)
		defer cancel()
		if _, err := c.pool.Exec(pingCtx, "SELECT 1"); err == nil {
			c.target.retryNow()
		}
		return probeInconclusive, ""
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	token := hex.EncodeToString(b[:])
	arrived := c.target.expectProbe(token)
	defer c.target.forgetProbe(token)

	sendCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.wait)
	sent := time.Now()
	var usage float64
	err := c.pool.QueryRow(sendCtx, "SELECT pg_notification_queue_usage() FROM pg_notify($1, $2)",
		c.target.probeChannel(), probePrefix+token).Scan(&usage)
	cancel()
	c.probes(err == nil, usage)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == sqlstateReadOnly {
			return probeLost, "the pool is connected to a standby in recovery (NOTIFY is refused there, and so are the producers' inserts)"
		}
		return probeInconclusive, "" // the pool is down: the polls say so
	}
	wait := time.NewTimer(c.wait)
	defer wait.Stop()
	select {
	case <-arrived:
		c.arrived(time.Since(sent))
		return probeArrived, ""
	case <-ctx.Done():
		return probeInconclusive, ""
	case <-wait.C:
	}
	if after, _ := c.target.connection(); after.gen != before.gen || !after.up {
		return probeInconclusive, "" // lost with a connection
	}
	c.lostOnes()
	return probeLost, c.diagnose(ctx, before.server)
}

// diagnose compares the Listener's server and database with the pool's
// and names the most likely reason a probe was lost.
func (c *deliveryCheck) diagnose(ctx context.Context, listener serverIdentity) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.wait)
	defer cancel()
	var pool serverIdentity
	err := c.pool.QueryRow(ctx, serverIdentitySQL).Scan(&pool.database, &pool.started, &pool.recovery)
	switch {
	case err != nil:
		return "unknown (the pool could not say which server it is on: " + err.Error() + ")"
	case pool.recovery:
		return "the pool is connected to a standby in recovery"
	case listener.database != "" && (listener.database != pool.database || listener.started != pool.started):
		return fmt.Sprintf("the Listener and the pool are on different databases or servers "+
			"(Listener: database %q, server started %s; pool: database %q, server started %s)",
			listener.database, listener.started, pool.database, pool.started)
	}
	return "the Listener's connection most likely goes through a pooler in transaction mode " +
		"(PgBouncer pool_mode=transaction), where a LISTEN does not outlive its transaction: " +
		"connect the Listener directly to PostgreSQL or through a session-mode pool"
}

// serverIdentity is what a connection says of where it is.
type serverIdentity struct {
	database string
	started  string // pg_postmaster_start_time: differs between servers
	recovery bool
}

const serverIdentitySQL = `SELECT current_database(), pg_postmaster_start_time()::text, pg_is_in_recovery()`

// probeChannel is the Listener's private channel, where probes go.
func (l *Listener) probeChannel() string { return l.healthChannel }

// expectProbe registers a probe token; the returned channel is closed when
// the Listener receives it.
func (l *Listener) expectProbe(token string) <-chan struct{} {
	ch := make(chan struct{})
	l.mu.Lock()
	l.probes[token] = ch
	l.mu.Unlock()
	return ch
}

func (l *Listener) forgetProbe(token string) {
	l.mu.Lock()
	delete(l.probes, token)
	l.mu.Unlock()
}

// probeArrived is called by the connection loop for a probe payload.
func (l *Listener) probeArrived(token string) {
	l.mu.Lock()
	ch := l.probes[token]
	delete(l.probes, token)
	l.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// WithDeliveryCheck sets how often a Listener proves, for each pool its
// watches use, that a NOTIFY sent through that pool reaches it, and how
// long it waits for one. It applies to a Listener. The default is every
// 10s with a 5s timeout, so a Listener that cannot hear the producers (a
// transaction-mode pooler in front of it, another database or server than
// the pool's, a pool on a standby) is reported within about 11s of start
// and 21s of a change. An interval of 0 or less turns the check off; with
// an interval, a timeout of 0 or less is an error.
func WithDeliveryCheck(interval, timeout time.Duration) Option {
	return func(o *options) {
		o.mark(optDeliveryCheck, interval > 0 && timeout <= 0, "WithDeliveryCheck(%v, %v): timeout must be positive", interval, timeout)
		o.deliveryInterval, o.deliveryTimeout = interval, timeout
	}
}

// WithFallbackPollInterval sets how often a watch polls while its
// Listener's delivery check finds that notifications do not arrive (see
// WithDeliveryCheck), instead of its poll interval. It applies to the
// watch functions. The default is 1s; a value of 0 or less is an error.
func WithFallbackPollInterval(d time.Duration) Option {
	return func(o *options) {
		o.mark(optFallbackPoll, d <= 0, "WithFallbackPollInterval(%v): must be positive", d)
		o.fallbackPoll = d
	}
}
