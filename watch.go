package jobwatch

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Watch is a running watch on one job table: a Listener subscription, a
// Poller and the installer that keeps the triggers in place. Stop it with
// Close or by cancelling the context it was started with.
type Watch struct {
	listener        *Listener
	sub             *Subscription
	poller          *Poller
	removeReconnect func()
	stopAfter       func() bool
	stats           *counters
	queues          map[string]bool // WithQueues; nil: every queue
	started         atomic.Bool     // the poller runs: reconnects call for catch-up
	done            chan struct{}

	// closing is held for reading by the notification callback while it
	// acts and taken for writing by Close, so that nothing reaches the
	// caller's channel once Close has returned (the caller may then close
	// it). The Listener's own goroutine never takes it.
	closing   sync.RWMutex
	closed    bool
	closeOnce sync.Once
}

// WatchForJob is WatchForJobWithPollerTriggerRepair with repair on.
func WatchForJob(ctx context.Context, pool *pgxpool.Pool, listener *Listener,
	tableName string, pollInterval time.Duration, wake chan<- Message,
	opts ...Option) (*Watch, error) {
	return WatchForJobWithPollerTriggerRepair(ctx, true, pool, listener, tableName, pollInterval, wake, opts...)
}

// WatchForJobWithPollerTriggerRepair watches a job table and puts a
// JobAvailable on wake whenever a job may be ready, never blocking (a full
// channel is logged, at most once per interval, see WithDropLogInterval).
//
// It makes the notification triggers current before it returns when it
// can (when they are, it only reads the catalog: a role without DDL rights
// works once a migration installed them). When it cannot, because the
// table does not exist yet, the role may not, or a lock is held, it says
// so in one log line and retries on a backoff of its own, 1s growing to
// 30s (WithInstallBackoff), never failing the call. It checks them again
// after every Listener reconnect and, with repair, after every interval
// poll. It subscribes to ChannelName(tableName) and starts PollForJob's
// poller. After every Listener reconnect it also puts one JobAvailable on
// wake and polls at once, because notifications sent while the Listener
// was disconnected are lost, and it polls at once after installing
// missing triggers. A notification announcing a job scheduled for later
// makes the poller check again when it is due.
//
// It returns an error, and starts nothing, for a nil listener or pool, an
// invalid table name, a nil or unbuffered channel, a poll interval that is
// not positive, an option that does not apply (see Option), a closed
// Listener, or a JobTable (WithJobTable) that cannot be watched
// (ErrInvalidJobTable; checked against the table when it exists, else
// said in one log line when it appears). The table need not exist yet.
func WatchForJobWithPollerTriggerRepair(ctx context.Context, repair bool,
	pool *pgxpool.Pool, listener *Listener, tableName string,
	pollInterval time.Duration, wake chan<- Message, opts ...Option) (*Watch, error) {
	n, o, err := validate("watch", pool, tableName, pollInterval, wake, scopeWatch, opts)
	if err != nil {
		return nil, err
	}
	if listener == nil {
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, ErrNilListener)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, err)
	}
	sh := &shape{}
	if err := checkDescription(ctx, pool, n, sh); err != nil {
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, err)
	}
	stats := newCounters(n, wake, o)
	w := &Watch{listener: listener, stats: stats, done: make(chan struct{})}
	if len(o.queues) > 0 {
		w.queues = make(map[string]bool, len(o.queues))
		for _, q := range o.queues {
			w.queues[q] = true
		}
	}
	inst := newInstaller(pool, n, sh, o, stats)
	w.poller = newPoller(pool, n, sh, pollInterval, o, stats, inst, repair)
	w.poller.watching = true
	if o.gate {
		w.poller.followGate()
	}
	// A first attempt now, so that the triggers are in place when this
	// returns; on failure the installer goes on by itself.
	if !inst.check(ctx, true) {
		inst.request(true)
	}

	w.removeReconnect = listener.AfterReconnect(func(context.Context, *pgx.Conn) error {
		// Runs on the Listener's goroutine: only signals.
		if w.started.Load() {
			// Not during this watch's own Subscribe: the first poll, which
			// comes after it, covers that one.
			inst.request(true)
			w.poller.reconnected()
		}
		return nil
	})
	// The poller starts after the subscription, so that a job inserted
	// between the first poll and the LISTEN cannot be missed.
	w.sub, err = listener.subscribe(ctx, n.channel, w.notified)
	if err != nil {
		w.removeReconnect()
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, err)
	}
	if o.fleet {
		w.poller.fleet = joinFleet(listener, pool, n.channel, o)
	}
	w.poller.monitor = joinMonitor(listener, pool, w.poller)
	w.poller.start(context.WithoutCancel(ctx))
	w.started.Store(true)
	w.stopAfter = context.AfterFunc(ctx, func() { _ = w.Close() })
	return w, nil
}

// notified acts on one notification on the table's channel.
func (w *Watch) notified(msg Notification) {
	w.closing.RLock()
	defer w.closing.RUnlock()
	if w.closed {
		return
	}
	w.stats.notifications.Add(1)
	p := ParsePayload(msg.Payload)
	if f := w.poller.fleet; f != nil && p.Key != 0 && !p.Poll {
		var mine bool
		if p, mine = f.share(p, w.stats, w.queues); !mine {
			return // another process's, or passed on
		}
	}
	if p.Gated {
		w.poller.gateSoon()
	}
	if p.Queued && w.queues != nil && !w.queues[p.Queue] {
		return // another queue's jobs (the gate's part is done above)
	}
	switch {
	case p.Poll:
		w.poller.pollSoon()
	case !p.At.IsZero():
		w.poller.scheduleAt(p.At)
	default:
		// n due jobs need no more wake-ups than the channel has room for:
		// a woken worker fetches until none is due. One that cannot be
		// delivered counts as dropped.
		w.stats.wake(max(min(p.Due, w.stats.room()), 1), causeNotification)
		if w.poller.opts.clockSkew > 0 {
			w.poller.post(func() { w.poller.wokeFor(p.Due, false) })
		}
	}
}

// Close unsubscribes, stops the poller and waits for it to exit. Once it
// returns nothing more is sent on the wake channel, so the caller may close
// it. Cancelling the watch's context does the same. Close is idempotent.
func (w *Watch) Close() error {
	if w == nil {
		return nil
	}
	w.closeOnce.Do(func() {
		if w.stopAfter != nil {
			w.stopAfter()
		}
		w.closing.Lock()
		w.closed = true
		w.closing.Unlock()
		w.removeReconnect()
		w.poller.monitor.leave(w.poller)
		w.poller.fleet.leave()
		w.listener.Unsubscribe(w.sub)
		_ = w.poller.Close()
		close(w.done)
	})
	<-w.done
	return nil
}

// Table returns the table name the watch was started with, as given.
func (w *Watch) Table() string { return w.poller.names.table.raw }

// Done returns a channel that is closed once the watch has stopped: after
// Close, or after its context was cancelled and it has unsubscribed and
// stopped its poller.
func (w *Watch) Done() <-chan struct{} { return w.done }

// Stats returns the watch's counters (its poller's included).
func (w *Watch) Stats() Stats { return w.poller.Stats() }
