package jobwatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strings"
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

// probeTarget is what the delivery check needs of its Listener: the
// connection state it publishes, a subscription, and the hint that the
// server can be reached again.
type probeTarget interface {
	connection() (connState, <-chan struct{})
	subscribe(ctx context.Context, channel string, callback func(Notification)) (*Subscription, error)
	Unsubscribe(sub *Subscription)
	retryNow()
}

// deliveryCheck is the check for one Listener and pool. Its probes go to
// a channel of its own, to which it subscribes like any subscriber.
type deliveryCheck struct {
	target         probeTarget
	pool           *pgxpool.Pool
	channel        string // where its probes go
	interval, wait time.Duration
	found          func(working bool, cause string)    // what it found, when it is sure
	probes         func(sent bool, queueUsage float64) // a probe tried; when sent, the queue usage it read
	arrived        func(roundTrip time.Duration)
	lostOnes       func()
	cancel         context.CancelFunc
	done           chan struct{}
	nudges         chan struct{} // buffered(1): the Listener lost its connection

	mu      sync.Mutex
	awaited map[string]chan struct{} // probes on their way, by token
	sub     *Subscription
}

// newDeliveryCheck makes a check of l and pool that waits wait for each
// probe; listen subscribes it.
func newDeliveryCheck(l *Listener, pool *pgxpool.Pool, wait time.Duration) *deliveryCheck {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &deliveryCheck{
		target: l, pool: pool, channel: "jobwatch_probe_" + hex.EncodeToString(b[:]), wait: wait,
		found: func(bool, string) {}, probes: func(bool, float64) {}, arrived: func(time.Duration) {}, lostOnes: func() {},
		awaited: map[string]chan struct{}{}, done: make(chan struct{}), nudges: make(chan struct{}, 1),
	}
}

// startDeliveryCheck runs the check of l and pool, every interval of l's
// options, until ctx ends or stop; found gets what it finds.
func startDeliveryCheck(ctx context.Context, l *Listener, pool *pgxpool.Pool, found func(working bool, cause string)) *deliveryCheck {
	ctx, cancel := context.WithCancel(ctx)
	c := newDeliveryCheck(l, pool, l.opts.deliveryTimeout)
	c.interval, c.found, c.cancel = l.opts.deliveryInterval, found, cancel
	c.probes = func(sent bool, usage float64) {
		l.stats.probes.Add(1)
		l.stats.queries.Add(1)
		if sent {
			l.stats.queueUsage.Store(math.Float64bits(usage))
		}
	}
	c.arrived = func(d time.Duration) { l.stats.roundTrip.Store(int64(d)) }
	c.lostOnes = func() { l.stats.probesLost.Add(1) }
	go c.run(ctx)
	return c
}

// listen subscribes the check to its probe channel.
func (c *deliveryCheck) listen(ctx context.Context) error {
	sub, err := c.target.subscribe(ctx, c.channel, c.received)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.sub = sub
	c.mu.Unlock()
	return nil
}

// unlisten ends the subscription.
func (c *deliveryCheck) unlisten() {
	c.mu.Lock()
	sub := c.sub
	c.sub = nil
	c.mu.Unlock()
	c.target.Unsubscribe(sub)
}

// received takes a notification on the probe channel.
func (c *deliveryCheck) received(n Notification) {
	token, ok := strings.CutPrefix(n.Payload, probePrefix)
	if !ok {
		return
	}
	c.mu.Lock()
	ch := c.awaited[token]
	delete(c.awaited, token)
	c.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// stop ends the check and waits for it; it may be called more than once.
func (c *deliveryCheck) stop() {
	if c != nil && c.cancel != nil {
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
	if c.listen(ctx) != nil {
		return // the Listener is closed
	}
	defer c.unlisten()
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
			c.found(true, "")
		case probeLost:
			lost++
			if lost == 1 {
				next = deliveryRetry // a second probe before saying anything
			} else {
				c.found(false, cause)
			}
		case probeInconclusive:
			if down.IsZero() {
				break
			}
			if time.Since(down) >= c.interval+c.wait {
				st, _ := c.target.connection()
				c.found(false, "the Listener is not connected: "+errorText(st.err))
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
	arrived := make(chan struct{})
	c.mu.Lock()
	c.awaited[token] = arrived
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.awaited, token)
		c.mu.Unlock()
	}()

	sendCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.wait)
	sent := time.Now()
	var usage float64
	err := c.pool.QueryRow(sendCtx, "SELECT pg_notification_queue_usage() FROM pg_notify($1, $2)",
		c.channel, probePrefix+token).Scan(&usage)
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
