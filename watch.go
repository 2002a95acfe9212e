// Package jobwatch tells a PostgreSQL-backed job runner when there is work.
//
// It installs statement-level AFTER INSERT and AFTER UPDATE triggers on a
// job table that NOTIFY a per-table channel, shares one LISTEN connection
// (a Listener) between every table a process watches, and runs a poller
// that finds what notifications cannot: jobs whose run_at passes later,
// and notifications lost while disconnected. Both put non-blocking
// JobAvailable messages on a buffered channel the caller owns; fetching and
// running the jobs stays with the caller.
//
// It is a Go port of IHP's IHP.Job.Queue.Watch and IHP.PGListener. It uses
// IHP's channel and trigger names and keeps IHP's trigger function,
// notify_job_queued_<table>, working for IHP's per-row triggers, so Go and
// IHP workers can share a table; its own statement triggers call
// jobwatch_notify_<table> (see CreateNotificationTriggerSQL).
package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Message is what the watcher puts on the caller's wake channel.
type Message int

const (
	// JobAvailable means a job may be ready: try to fetch one.
	JobAvailable Message = iota + 1
	// Stop is never sent by the library; it is for callers' own use, for
	// example to tell their workers to shut down.
	Stop
)

// String returns the message's name.
func (m Message) String() string {
	switch m {
	case JobAvailable:
		return "JobAvailable"
	case Stop:
		return "Stop"
	}
	return "Message(" + strconv.Itoa(int(m)) + ")"
}

// Watch is a running watch on one job table: a Listener subscription and a
// Poller. Stop it with Close or by cancelling the context it was started
// with.
type Watch struct {
	listener        *Listener
	sub             *Subscription
	poller          *Poller
	removeReconnect func()
	stopAfter       func() bool
	stats           *counters
	done            chan struct{}

	// closing is held for reading by the callbacks while they act and
	// taken for writing by Close, so that nothing reaches the caller's
	// channel once Close has returned (the caller may then close it).
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
// It installs the notification triggers (a failure is logged and the poller
// retries it when repair is on, never fatal), re-installs them after every
// Listener (re)connect, subscribes to ChannelName(tableName), and starts
// PollForJob(ctx, repair, ...). After every Listener reconnect it also puts
// one JobAvailable on wake and polls at once, because notifications sent
// while the Listener was disconnected are lost. A notification announcing a
// job scheduled for later makes the poller check again when it is due.
//
// It returns an error, and starts nothing, for a nil listener or pool, an
// invalid table name, a nil or unbuffered channel or a poll interval that
// is not positive. The table need not exist yet.
func WatchForJobWithPollerTriggerRepair(ctx context.Context, repair bool,
	pool *pgxpool.Pool, listener *Listener, tableName string,
	pollInterval time.Duration, wake chan<- Message, opts ...Option) (*Watch, error) {
	n, err := validate(pool, tableName, pollInterval, wake)
	if err != nil {
		return nil, err
	}
	if listener == nil {
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, ErrNilListener)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, err)
	}
	o := buildOptions(opts)
	stats := newCounters(n, wake, o)
	log := o.logger

	install := func(ctx context.Context, db execer, when string) {
		err := installTriggers(ctx, db, n, o.gate)
		switch {
		case err == nil:
		case ctx.Err() != nil:
		case errors.Is(err, ErrTriggersBusy):
			log.Info("jobwatch: notification triggers not installed now, the poller will retry",
				"table", tableName, "when", when, "error", err)
		default:
			stats.setError(err)
			log.Error("jobwatch: failed to install notification triggers, falling back to the poller",
				"table", tableName, "when", when, "error", err)
		}
	}
	install(ctx, pool, "start")

	w := &Watch{listener: listener, stats: stats, done: make(chan struct{})}
	// The poller starts after the subscription so that a job inserted
	// between the first poll and the LISTEN cannot be missed; the reconnect
	// callback may run before it exists.
	pollerReady := make(chan struct{})
	w.removeReconnect = listener.addReconnect(func(ctx context.Context, conn *pgx.Conn) error {
		select {
		case <-pollerReady:
		default:
			// A connect during this watch's own Subscribe: the install
			// above and the poller's first poll, which comes after it,
			// already cover it.
			return nil
		}
		install(ctx, conn, "reconnect")
		w.closing.RLock()
		defer w.closing.RUnlock()
		if !w.closed {
			stats.wake(1)
			w.poller.pollSoon()
		}
		return nil
	})
	w.sub, err = listener.Subscribe(n.channel, func(msg Notification) {
		w.closing.RLock()
		defer w.closing.RUnlock()
		if w.closed {
			return
		}
		stats.notifications.Add(1)
		due, later, gated := parsePayload(msg.Payload)
		if gated {
			select {
			case <-pollerReady:
				w.poller.trailIn(trailDelay)
			default:
			}
		}
		switch {
		case later > 0:
			select {
			case <-pollerReady:
				w.poller.scheduleIn(later)
			default:
			}
		case due > 1:
			stats.wakeUpTo(due)
		default:
			stats.wake(1)
		}
	})
	if err != nil {
		w.removeReconnect()
		return nil, fmt.Errorf("jobwatch: watch %s: %w", tableName, err)
	}
	w.poller = startPoller(context.WithoutCancel(ctx), repair, pool, n, pollInterval, wake, o, stats)
	close(pollerReady)
	w.stopAfter = context.AfterFunc(ctx, func() { _ = w.Close() })
	return w, nil
}

// parsePayload reads a notification payload (see payloadDue, payloadIn and
// payloadGated): how many jobs are due now, or how long until the earliest
// is due, and whether a notify gate sent it. Unknown payloads count as one
// due job.
func parsePayload(p string) (due int64, later time.Duration, gated bool) {
	if rest, ok := strings.CutPrefix(p, payloadGated); ok {
		p, gated = rest, true
	}
	switch {
	case strings.HasPrefix(p, payloadDue):
		if n, err := strconv.ParseInt(p[len(payloadDue):], 10, 64); err == nil && n > 0 {
			return n, 0, gated
		}
	case strings.HasPrefix(p, payloadIn):
		if secs, err := strconv.ParseFloat(p[len(payloadIn):], 64); err == nil && secs > 0 {
			return 0, time.Duration(secs * float64(time.Second)), gated
		}
	}
	return 1, 0, gated
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
		w.listener.Unsubscribe(w.sub)
		_ = w.poller.Close()
		close(w.done)
	})
	<-w.done
	return nil
}

// Done returns a channel that is closed once the watch has stopped: after
// Close, or after its context was cancelled and it has unsubscribed and
// stopped its poller.
func (w *Watch) Done() <-chan struct{} { return w.done }

// Stats returns the watch's counters (its poller's included).
func (w *Watch) Stats() Stats { return w.stats.snapshot() }
