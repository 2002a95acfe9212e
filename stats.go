package jobwatch

import (
	"math"
	"sync/atomic"
	"time"
)

// Stats is a snapshot of a Watch's or Poller's counters, for metrics. All
// are counts since start, safe to read at any time.
type Stats struct {
	Notifications  uint64        // notifications received on the table's channel
	WakeupsSent    uint64        // JobAvailable messages put on the wake channel
	Wakeups        Wakeups       // the same, by what called for them
	WakeupsDropped uint64        // JobAvailable messages dropped because the channel was full
	Polls          uint64        // polls run
	PollErrors     uint64        // polls that failed
	PollTime       time.Duration // time spent in poll queries, all polls together
	TriggerRepairs uint64        // times missing triggers were re-created
	// Queries counts every query the watch or poller sent through the pool
	// itself: polls, trigger checks and installs. The checks its Listener
	// runs for all its watches are in ListenerStats.Queries.
	Queries      uint64
	PollInterval time.Duration // the interval polls run at now: the poll interval, or the fallback while notifications do not arrive
	LastError    error         // the last poll, install or repair error; nil if none
	LastErrorAt  time.Time     // when LastError happened
	// NotificationsWorking says whether the watch relies on notifications
	// now: true, or false while it polls at its fallback interval because
	// they fail it (FallbackCause says how). It starts true. A Poller
	// alone receives no notifications: false.
	NotificationsWorking   bool
	NotificationsChangedAt time.Time // when NotificationsWorking last changed (or the watch started)
	// FallbackCause says why the watch polls at its fallback interval
	// (WithFallbackPollInterval) rather than its poll interval: the
	// Listener's delivery check finds that notifications sent through the
	// pool do not reach it (see WithDeliveryCheck), the Listener was
	// closed, the triggers do not notify and cannot be repaired, or the
	// notify gate's skip counter cannot be read. "" while it does not.
	FallbackCause string
	// Fleet is the watch's membership of its table's fleet (WithFleet).
	Fleet FleetStats
}

// Wakeups counts JobAvailable messages sent, by what called for them.
type Wakeups struct {
	Notification uint64 // a notification on the table's channel
	Poll         uint64 // a poll at the interval (or the fallback interval), or one asked for ("poll", an install)
	Scheduled    uint64 // a poll at the moment a job scheduled for later became due
	Gate         uint64 // a poll behind the notify gate: transactions skipped their NOTIFY
	Reconnect    uint64 // the Listener reconnected: notifications sent meanwhile are lost
	// Rescue: in a fleet (WithFleet), jobs due for a while that the
	// process chosen for them did not take.
	Rescue uint64
}

// FleetStats are a watch's counts as a member of its table's fleet
// (WithFleet); all zero outside one.
type FleetStats struct {
	Members int    // the members the last check saw, this process included when it is one
	Member  bool   // this process is a member now: its presence lock is held, and the last check saw it
	Chosen  uint64 // notifications this process was chosen for (passed to it included)
	Left    uint64 // notifications left to the member chosen for them
	Passed  uint64 // wake-ups passed on to the next member for want of room
	Dropped uint64 // passes that could not be sent (the rescue finds their jobs)
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
	// DeliveryProbes counts the delivery check's probes sent through the
	// watches' pools (see WithDeliveryCheck), DeliveryProbesLost those
	// that did not arrive while the connection was up.
	DeliveryProbes     uint64
	DeliveryProbesLost uint64
	// DeliveryRoundTrip is how long the last probe that arrived took, from
	// its NOTIFY through the pool to the Listener.
	DeliveryRoundTrip time.Duration
	// NotifyQueueUsage is the share of the server's notification queue in
	// use (pg_notification_queue_usage()) when the last probe was sent: a
	// full queue makes every NOTIFY, so every INSERT of a job, fail.
	NotifyQueueUsage float64
	// Queries counts every query the Listener sent, over its own
	// connection (the health check) and through the watches' pools (the
	// delivery check, and the notify gate's check of every table it
	// serves), LISTEN and UNLISTEN aside.
	Queries uint64
}

// listenerCounters are the Listener's counters; its connection state is
// kept by the connection loop (connState) and only read into Stats.
type listenerCounters struct {
	notifications atomic.Uint64
	probes        atomic.Uint64
	probesLost    atomic.Uint64
	queries       atomic.Uint64
	roundTrip     atomic.Int64  // nanoseconds
	queueUsage    atomic.Uint64 // float64 bits
}

func (c *listenerCounters) snapshot() ListenerStats {
	return ListenerStats{
		Notifications:      c.notifications.Load(),
		DeliveryProbes:     c.probes.Load(),
		DeliveryProbesLost: c.probesLost.Load(),
		Queries:            c.queries.Load(),
		DeliveryRoundTrip:  time.Duration(c.roundTrip.Load()),
		NotifyQueueUsage:   math.Float64frombits(c.queueUsage.Load()),
	}
}

type timedError struct {
	err error
	at  time.Time
}

// counters is the live state behind Stats, shared by a Watch and its
// Poller, with the waker that sends on the wake channel.
type counters struct {
	waker
	notifications atomic.Uint64
	polls         atomic.Uint64
	pollErrors    atomic.Uint64
	pollNanos     atomic.Int64
	repairs       atomic.Uint64
	queries       atomic.Uint64
	lastErr       atomic.Pointer[timedError]
}

func newCounters(n names, wake chan<- Message, o options) *counters {
	c := &counters{}
	c.init(wake, o.dropLogInterval, o.logger, n.table.raw)
	return c
}

func (c *counters) setError(err error) {
	c.lastErr.Store(&timedError{err: err, at: time.Now()})
}

func (c *counters) snapshot() Stats {
	s := Stats{
		Notifications:  c.notifications.Load(),
		WakeupsSent:    c.sent.Load(),
		WakeupsDropped: c.drops.total.Load(),
		Polls:          c.polls.Load(),
		PollErrors:     c.pollErrors.Load(),
		PollTime:       time.Duration(c.pollNanos.Load()),
		TriggerRepairs: c.repairs.Load(),
		Queries:        c.queries.Load(),
		Wakeups: Wakeups{
			Notification: c.causes[causeNotification].Load(),
			Poll:         c.causes[causePoll].Load(),
			Scheduled:    c.causes[causeScheduled].Load(),
			Gate:         c.causes[causeGate].Load(),
			Reconnect:    c.causes[causeReconnect].Load(),
			Rescue:       c.causes[causeRescue].Load(),
		},
	}
	if e := c.lastErr.Load(); e != nil {
		s.LastError, s.LastErrorAt = e.err, e.at
	}
	return s
}
