package jobwatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
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
// until a probe arrives again, which is logged once too.

// probePrefix starts the payload of a probe.
const probePrefix = "probe:"

// deliveryRemind is how often a delivery failure that lasts is logged
// again.
const deliveryRemind = 5 * time.Minute

// deliveryRetry is how soon a lost probe is followed by a second one.
const deliveryRetry = time.Second

// deliveryCheck is the check for one Listener and pool.
type deliveryCheck struct {
	l        *Listener
	pool     *pgxpool.Pool
	problems problemLog
	cancel   context.CancelFunc
	done     chan struct{}
	nudge    chan struct{} // buffered(1): the Listener lost its connection

	mu        sync.Mutex
	watches   map[*Watch]bool
	working   bool
	changedAt time.Time
}

// joinDeliveryCheck adds w to the check of l and pool, starting it if w is
// the first, and returns it; nil when the check is off.
func (l *Listener) joinDeliveryCheck(pool *pgxpool.Pool, w *Watch) *deliveryCheck {
	if l.opts.deliveryInterval <= 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	c := l.checks[pool]
	if c == nil {
		ctx, cancel := context.WithCancel(l.ctx)
		c = &deliveryCheck{
			l: l, pool: pool, cancel: cancel, done: make(chan struct{}), nudge: make(chan struct{}, 1),
			problems: problemLog{log: l.log, remind: deliveryRemind},
			watches:  map[*Watch]bool{}, working: true, changedAt: time.Now(),
		}
		l.checks[pool] = c
		go c.run(ctx)
	}
	c.mu.Lock()
	c.watches[w] = true
	c.mu.Unlock()
	return c
}

// leave removes w; the last watch to leave stops the check.
func (c *deliveryCheck) leave(w *Watch) {
	if c == nil {
		return
	}
	l := c.l
	l.mu.Lock()
	c.mu.Lock()
	delete(c.watches, w)
	last := len(c.watches) == 0
	c.mu.Unlock()
	if last && l.checks[c.pool] == c {
		delete(l.checks, c.pool)
	}
	l.mu.Unlock()
	if last {
		c.cancel()
		<-c.done
	}
}

// connectionLost is called by the Listener when its connection goes: the
// check then looks every second whether the pool reaches a server again.
func (c *deliveryCheck) connectionLost() {
	select {
	case c.nudge <- struct{}{}:
	default:
	}
}

// state returns whether notifications arrive and since when that holds.
func (c *deliveryCheck) state() (bool, time.Time) {
	if c == nil {
		return false, time.Time{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.working, c.changedAt
}

func (c *deliveryCheck) run(ctx context.Context) {
	defer close(c.done)
	interval := c.l.opts.deliveryInterval
	next := time.Duration(0) // the first probe as soon as the Listener is connected
	lost := 0
	var down time.Time // since when the Listener is not connected
	for {
		t := time.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-c.nudge:
			t.Stop()
		}
		next = interval
		outcome, cause := c.probe(ctx)
		switch outcome {
		case probeArrived:
			lost = 0
			c.set(true, "")
		case probeLost:
			lost++
			if lost == 1 {
				next = deliveryRetry // a second probe before saying anything
			} else {
				c.set(false, cause)
			}
		case probeInconclusive:
			if c.l.stats.connected.Load() {
				down = time.Time{}
				break
			}
			// A Listener that cannot connect hears nothing either: after
			// as long as a probe takes to fail twice, poll around it.
			if down.IsZero() {
				down = time.Now()
			}
			if time.Since(down) >= interval+c.l.opts.deliveryTimeout {
				c.set(false, "the Listener is not connected: "+c.l.lastError())
			}
			next = deliveryRetry
		}
	}
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
	l := c.l
	if !l.stats.connected.Load() {
		// While the Listener retries on its backoff, a pool that reaches a
		// server again (after a failover, a restart) means it should try
		// now rather than at the end of a delay that grew with the outage.
		pingCtx, cancel := context.WithTimeout(ctx, l.opts.deliveryTimeout)
		defer cancel()
		if _, err := c.pool.Exec(pingCtx, "SELECT 1"); err == nil {
			l.retryNow()
		}
		return probeInconclusive, ""
	}
	connects := l.stats.connects.Load()
	var b [8]byte
	_, _ = rand.Read(b[:])
	token := hex.EncodeToString(b[:])
	arrived := l.expectProbe(token)
	defer l.forgetProbe(token)

	timeout := l.opts.deliveryTimeout
	sendCtx, cancel := context.WithTimeout(ctx, timeout)
	_, err := c.pool.Exec(sendCtx, "SELECT pg_notify($1, $2)", l.healthChannel, probePrefix+token)
	cancel()
	l.stats.probes.Add(1)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == sqlstateReadOnly {
			return probeLost, "the pool is connected to a standby in recovery (NOTIFY is refused there, and so are the producers' inserts)"
		}
		return probeInconclusive, "" // the pool is down: the polls say so
	}
	wait := time.NewTimer(timeout)
	defer wait.Stop()
	select {
	case <-arrived:
		return probeArrived, ""
	case <-ctx.Done():
		return probeInconclusive, ""
	case <-wait.C:
	}
	if l.stats.connects.Load() != connects || !l.stats.connected.Load() {
		return probeInconclusive, "" // lost with a connection
	}
	l.stats.probesLost.Add(1)
	return probeLost, c.diagnose(ctx)
}

// diagnose compares the Listener's server and database with the pool's
// and names the most likely reason a probe was lost.
func (c *deliveryCheck) diagnose(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, c.l.opts.deliveryTimeout)
	defer cancel()
	var pool serverIdentity
	err := c.pool.QueryRow(ctx, serverIdentitySQL).Scan(&pool.database, &pool.started, &pool.recovery)
	listener := c.l.identity()
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

// set records whether notifications arrive and, on a change, logs it once
// and tells every watch.
func (c *deliveryCheck) set(working bool, cause string) {
	c.mu.Lock()
	changed := c.working != working
	watches := make([]*Watch, 0, len(c.watches))
	for w := range c.watches {
		watches = append(watches, w)
	}
	c.mu.Unlock()
	if working {
		c.problems.clear("jobwatch: notifications arrive again; polling at the normal interval")
	} else {
		c.problems.report(slog.LevelError, cause,
			"jobwatch: notifications do not reach the Listener: a NOTIFY sent through the pool was not received, twice. "+
				"Jobs are found by polling every fallback interval until they do.",
			"cause", cause, "fallback_poll", fallbackOf(watches))
	}
	if changed {
		// The watches first, then the state their Stats report.
		for _, w := range watches {
			w.deliveryChanged(working)
		}
		c.mu.Lock()
		c.working, c.changedAt = working, time.Now()
		c.mu.Unlock()
	}
}

func fallbackOf(watches []*Watch) time.Duration {
	if len(watches) == 0 {
		return defaultFallbackPoll
	}
	return watches[0].fallback
}

// serverIdentity is what a connection says of where it is.
type serverIdentity struct {
	database string
	started  string // pg_postmaster_start_time: differs between servers
	recovery bool
}

const serverIdentitySQL = `SELECT current_database(), pg_postmaster_start_time()::text, pg_is_in_recovery()`

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

// lastError is the Listener's last connection error, as text.
func (l *Listener) lastError() string {
	if e := l.stats.lastErr.Load(); e != nil {
		return e.err.Error()
	}
	return "not connected yet"
}

// identity returns what the Listener's connection said of its server at
// connect.
func (l *Listener) identity() serverIdentity {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.server
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
