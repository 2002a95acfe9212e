package jobwatch

import (
	"log/slog"
	"time"
)

// Option configures a Listener or a watch/poll call. Options that do not
// apply to a call are ignored by it.
type Option func(*options)

type options struct {
	logger              *slog.Logger
	jitter              time.Duration
	healthCheckInterval time.Duration
	healthCheckTimeout  time.Duration
	dropLogInterval     time.Duration
	gate                bool
}

const (
	defaultJitter              = 2 * time.Second
	defaultHealthCheckInterval = 10 * time.Second
	defaultHealthCheckTimeout  = 5 * time.Second
	defaultDropLogInterval     = 10 * time.Second
)

func buildOptions(opts []Option) options {
	o := options{
		logger:              slog.Default(),
		jitter:              defaultJitter,
		healthCheckInterval: defaultHealthCheckInterval,
		healthCheckTimeout:  defaultHealthCheckTimeout,
		dropLogInterval:     defaultDropLogInterval,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	if o.logger == nil {
		o.logger = slog.Default()
	}
	if o.jitter < 0 {
		o.jitter = 0
	}
	if o.healthCheckTimeout <= 0 {
		o.healthCheckTimeout = defaultHealthCheckTimeout
	}
	if o.dropLogInterval <= 0 {
		o.dropLogInterval = defaultDropLogInterval
	}
	return o
}

// WithLogger sets the logger for errors and notable events (trigger repairs,
// reconnects, a full wake channel). The default is slog.Default(); nil keeps
// the default.
func WithLogger(logger *slog.Logger) Option {
	return func(o *options) { o.logger = logger }
}

// WithJitter sets the largest random delay added to each poll interval, so
// that many processes started together do not poll in step. The default is
// 2s, as in IHP; 0 turns jitter off.
func WithJitter(max time.Duration) Option {
	return func(o *options) { o.jitter = max }
}

// WithHealthCheck sets how often a Listener proves its connection alive by
// sending a NOTIFY to a private channel and receiving it back, and how long
// it waits for that round trip before it drops the connection and
// reconnects. A silently dead connection (no RST: a firewall, a failover)
// is noticed within interval+timeout; the default is 10s+5s. An interval of
// 0 or less turns the check off.
func WithHealthCheck(interval, timeout time.Duration) Option {
	return func(o *options) {
		o.healthCheckInterval = interval
		o.healthCheckTimeout = timeout
	}
}

// WithDropLogInterval sets how often, at most, a watch or poller logs that
// the caller's wake channel was full (with the number of wake-ups dropped
// since the last such line). The default is 10s.
func WithDropLogInterval(d time.Duration) Option {
	return func(o *options) { o.dropLogInterval = d }
}

// WithNotifyGate makes the triggers this call installs (EnsureNotificationTriggers,
// the watch and poll functions, CreateNotificationTriggerSQLWith) use a
// notify gate, for tables that many concurrent transactions insert into.
//
// PostgreSQL commits notifying transactions one at a time (NOTIFY holds a
// global lock through the commit and its disk flush), which caps concurrent
// single-row inserts at a fraction of what the table takes without a
// trigger. With the gate, of the transactions inserting jobs at the same
// time only one notifies; the others skip their NOTIFY and hold a marker
// lock until they end, and each watch, on a gated notification, polls
// again every 5ms while such a transaction is open and once after. A
// skipped job is therefore woken about 5ms after its commit, or when the
// notifying transaction (or any later one) commits if that is later: a
// long transaction that inserted a job delays the jobs of the transactions
// that skipped behind it until it commits, and if it rolls back and nothing
// else is inserted after, they wait for the next poll. Without the gate
// (the default) every committing transaction notifies.
//
// Use the same setting in every process that installs the triggers of a
// table: each installation replaces the trigger function.
func WithNotifyGate(on bool) Option {
	return func(o *options) { o.gate = on }
}
