package jobwatch

import (
	"sync"
	"sync/atomic"
	"time"
)

// ChannelName returns the notification channel of a job table: for a plain
// table name IHP's "job_available_<table>", for a schema-qualified one
// "job_available_<schema>.<table>", shortened with a hash suffix when it
// would pass PostgreSQL's 63-byte limit. Quoted parts keep their case.
//
// A name that cannot be a table name (see [ErrInvalidTableName]) gets a
// channel that no trigger of this package ever notifies.
func ChannelName(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return ownName("jobwatch_invalid_", tableName)
	}
	return n.channel
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
func (c *counters) wake(n int64, cause wakeCause) {
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
func (c *counters) room() int64 { return int64(cap(c.wakeCh) - len(c.wakeCh)) }

// capacity is the wake channel's capacity.
func (c *counters) capacity() int { return cap(c.wakeCh) }
