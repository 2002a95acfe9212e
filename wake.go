package jobwatch

import (
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
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

// wakeCause says what called for a wake-up, an index into counters.causes.
type wakeCause int

const (
	causeNotification wakeCause = iota
	causePoll
	causeScheduled
	causeGate
	causeReconnect
	causeRescue
	numCauses
)

// waker sends JobAvailable messages on the caller's wake channel, never
// blocking, and counts them by cause and the ones dropped.
type waker struct {
	wakeCh chan<- Message
	sent   atomic.Uint64
	causes [numCauses]atomic.Uint64
	drops  *dropReporter
}

// init sets the waker up for wake; the lines about a full channel name
// table.
func (w *waker) init(wake chan<- Message, dropLogInterval time.Duration, log *slog.Logger, table string) {
	w.wakeCh = wake
	w.drops = &dropReporter{
		interval: dropLogInterval,
		report: func(dropped uint64, stuck time.Duration) {
			if stuck > 0 {
				log.Warn("jobwatch: wake channel full: nothing could be sent to it for a while; is its reader stuck?",
					"table", table, "dropped", dropped, "for", stuck.Round(time.Millisecond))
				return
			}
			log.Debug("jobwatch: wake channel full, wake-ups dropped (its reader is busy)", "table", table, "dropped", dropped)
		},
	}
	w.drops.lastSent.Store(time.Now().UnixNano())
}

// trySend puts msg on wake without blocking and reports whether it did.
func trySend(wake chan<- Message, msg Message) bool {
	select {
	case wake <- msg:
		return true
	default:
		return false
	}
}

// dropReporter counts wake-ups dropped because the caller's channel was
// full and logs them at most once per interval, with the count since the
// last report, so a stalled consumer cannot flood the log. A full channel
// is normal for a reader that drains it at each wake-up while it is busy:
// that is said at debug level. When nothing could be sent for a whole
// interval, the reader looks stuck, and that is a warning.
type dropReporter struct {
	interval time.Duration
	report   func(dropped uint64, stuck time.Duration)

	mu       sync.Mutex
	pending  uint64
	last     time.Time
	lastSent atomic.Int64 // unix nanoseconds of the last wake-up sent
	total    atomic.Uint64
}

func (d *dropReporter) dropped(n uint64) {
	d.total.Add(n)
	d.mu.Lock()
	d.pending += n
	now := time.Now()
	if !d.last.IsZero() && now.Sub(d.last) < d.interval {
		d.mu.Unlock()
		return
	}
	count := d.pending
	d.pending = 0
	d.last = now
	d.mu.Unlock()
	var stuck time.Duration
	if since := now.Sub(time.Unix(0, d.lastSent.Load())); since >= d.interval {
		stuck = since
	}
	d.report(count, stuck)
}

// wake sends n JobAvailable without blocking, for cause; those the
// channel has no room for are dropped, counted and logged (see
// dropReporter).
func (c *waker) wake(n int64, cause wakeCause) {
	var sent, dropped uint64
	for range n {
		if trySend(c.wakeCh, JobAvailable) {
			sent++
		} else {
			dropped = uint64(n) - sent
			break
		}
	}
	if sent > 0 {
		c.sent.Add(sent)
		c.causes[cause].Add(sent)
		c.drops.lastSent.Store(time.Now().UnixNano())
	}
	if dropped > 0 {
		c.drops.dropped(dropped)
	}
}

// room is how many more messages the wake channel holds now.
func (c *waker) room() int64 { return int64(cap(c.wakeCh) - len(c.wakeCh)) }

// capacity is the wake channel's capacity.
func (c *waker) capacity() int { return cap(c.wakeCh) }
