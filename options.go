package jobwatch

import (
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Option configures a Listener, a watch or poll call, or the trigger
// functions. Each option says where it applies; one given where it does not
// apply, or with a value out of range, makes the call return an error
// wrapping ErrInvalidOption (CreateNotificationTriggerSQLWith returns a
// script that raises it), so a misplaced option never does nothing
// silently.
type Option func(*options)

// optionSet records which options a call was given, by bit.
type optionSet uint32

const (
	optLogger optionSet = 1 << iota
	optJitter
	optHealthCheck
	optDropLogInterval
	optNotifyGate
	optInstallBackoff
	optDeliveryCheck
	optFallbackPoll
	optJobTable
	optQueues
	optClockSkew
	optFleet
)

var optionNames = []string{"WithLogger", "WithJitter", "WithHealthCheck", "WithDropLogInterval",
	"WithNotifyGate", "WithInstallBackoff", "WithDeliveryCheck", "WithFallbackPollInterval",
	"WithJobTable", "WithQueues", "WithClockSkew", "WithFleet"}

// Where each option applies.
const (
	scopeListener = optLogger | optHealthCheck | optDeliveryCheck
	scopeWatch    = optLogger | optJitter | optDropLogInterval | optNotifyGate | optInstallBackoff | optFallbackPoll | optJobTable | optQueues | optClockSkew | optFleet
	scopePoll     = optLogger | optJitter | optDropLogInterval | optNotifyGate | optInstallBackoff | optJobTable | optQueues | optClockSkew
	scopeTriggers = optLogger | optNotifyGate | optJobTable
	scopeDiagnose = optJobTable
)

type options struct {
	set     optionSet
	invalid []string

	logger              *slog.Logger
	jitter              time.Duration
	healthCheckInterval time.Duration
	healthCheckTimeout  time.Duration
	dropLogInterval     time.Duration
	gate                bool
	installMin          time.Duration
	installMax          time.Duration
	deliveryInterval    time.Duration
	deliveryTimeout     time.Duration
	fallbackPoll        time.Duration
	job                 JobTable
	queues              []string
	clockSkew           time.Duration
	fleet               bool
	room                func() int
}

const (
	defaultJitter              = 2 * time.Second
	defaultHealthCheckInterval = 10 * time.Second
	defaultHealthCheckTimeout  = 5 * time.Second
	defaultDropLogInterval     = 10 * time.Second
	defaultInstallMin          = time.Second
	defaultInstallMax          = 30 * time.Second
	defaultDeliveryInterval    = 10 * time.Second
	defaultDeliveryTimeout     = 5 * time.Second
	defaultFallbackPoll        = time.Second
)

// buildOptions applies opts over the defaults and returns an error wrapping
// ErrInvalidOption when one does not apply to scope or has a bad value.
func buildOptions(scope optionSet, opts []Option) (options, error) {
	o := options{
		logger:              slog.Default(),
		jitter:              defaultJitter,
		healthCheckInterval: defaultHealthCheckInterval,
		healthCheckTimeout:  defaultHealthCheckTimeout,
		dropLogInterval:     defaultDropLogInterval,
		installMin:          defaultInstallMin,
		installMax:          defaultInstallMax,
		deliveryInterval:    defaultDeliveryInterval,
		deliveryTimeout:     defaultDeliveryTimeout,
		fallbackPoll:        defaultFallbackPoll,
		gate:                true,
		job:                 IHPJobTable,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	if o.logger == nil {
		o.logger = slog.Default()
	}
	var wrong []string
	for i, name := range optionNames {
		if bit := optionSet(1) << i; o.set&bit != 0 && scope&bit == 0 {
			wrong = append(wrong, name)
		}
	}
	if len(wrong) > 0 {
		return o, fmt.Errorf("%w: %s does not apply here", ErrInvalidOption, strings.Join(wrong, ", "))
	}
	if o.set&optQueues != 0 && o.job.Queue == "" {
		o.invalid = append(o.invalid, "WithQueues needs WithJobTable with a Queue column")
	}
	if o.fleet && o.job != IHPJobTable && o.job.RunAt == "" {
		o.invalid = append(o.invalid, "WithFleet needs a JobTable with a RunAt column: a job's age is what tells that the process chosen for it did not take it")
	}
	if len(o.invalid) > 0 {
		return o, fmt.Errorf("%w: %s", ErrInvalidOption, strings.Join(o.invalid, "; "))
	}
	return o, nil
}

func (o *options) mark(bit optionSet, bad bool, format string, args ...any) {
	o.set |= bit
	if bad {
		o.invalid = append(o.invalid, fmt.Sprintf(format, args...))
	}
}

// WithLogger sets the logger for errors and notable events (trigger
// installs, reconnects, a full wake channel). It applies everywhere. The
// default is slog.Default(); nil keeps the default.
func WithLogger(logger *slog.Logger) Option {
	return func(o *options) {
		o.mark(optLogger, false, "")
		o.logger = logger
	}
}

// WithJitter sets the largest random delay added to each poll interval, so
// that many processes started together do not poll in step. It applies to
// the watch and poll functions. The default is 2s, as in IHP; 0 turns
// jitter off; a negative value is an error.
func WithJitter(max time.Duration) Option {
	return func(o *options) {
		o.mark(optJitter, max < 0, "WithJitter(%v): negative", max)
		o.jitter = max
	}
}

// WithHealthCheck sets how often a Listener proves its connection alive by
// sending a NOTIFY to a private channel and receiving it back, and how long
// it waits for that round trip before it drops the connection and
// reconnects. A silently dead connection (no RST: a firewall, a failover)
// is noticed within interval+timeout; the default is 10s+5s. It applies to
// a Listener. An interval of 0 or less turns the check off; with an
// interval, a timeout of 0 or less is an error.
func WithHealthCheck(interval, timeout time.Duration) Option {
	return func(o *options) {
		o.mark(optHealthCheck, interval > 0 && timeout <= 0, "WithHealthCheck(%v, %v): timeout must be positive", interval, timeout)
		o.healthCheckInterval = interval
		o.healthCheckTimeout = timeout
	}
}

// WithDropLogInterval sets how often, at most, a watch or poller logs that
// the caller's wake channel was full (with the number of wake-ups dropped
// since the last such line). It applies to the watch and poll functions.
// The default is 10s; a value of 0 or less is an error.
func WithDropLogInterval(d time.Duration) Option {
	return func(o *options) {
		o.mark(optDropLogInterval, d <= 0, "WithDropLogInterval(%v): must be positive", d)
		o.dropLogInterval = d
	}
}

// WithInstallBackoff sets how a watch (and a poller with repair) retries
// installing the notification triggers while they cannot be installed,
// because the table does not exist yet, another installer or a writer
// holds a lock, or the role lacks the right: after min at first, the delay
// doubling up to max, whatever the poll interval. It applies to the watch
// and poll functions. The default is 1s to 30s.
func WithInstallBackoff(min, max time.Duration) Option {
	return func(o *options) {
		o.mark(optInstallBackoff, min <= 0 || max < min, "WithInstallBackoff(%v, %v): want 0 < min <= max", min, max)
		o.installMin, o.installMax = min, max
	}
}

// WithNotifyGate sets whether the triggers this call installs
// (EnsureNotificationTriggers, the watch and poll functions,
// CreateNotificationTriggerSQLWith) use the notify gate, and whether a
// watch follows it. It applies to the watch, poll and trigger functions.
// The gate is on by default: of the transactions inserting jobs into a
// table at the same time only one notifies, so concurrent producers are
// not made to commit in single file; the others' jobs are woken a few
// milliseconds after their commit under load, and within 500ms whatever
// other transactions and roles do. docs/how-it-works.md tells how,
// and what it costs. Off, every transaction that leaves a job pending
// notifies. Use the same setting in every process that installs the
// triggers of a table: each installation replaces the trigger function.
func WithNotifyGate(on bool) Option {
	return func(o *options) {
		o.mark(optNotifyGate, false, "")
		o.gate = on
	}
}

// WithClockSkew is for workers that compare the due time with their own
// clock rather than the server's (gue, btubbs/pgq: run_at <= $now from the
// application), which may be up to max behind the server's: a wake-up at
// the moment the server says a job is due would find nothing, and the job
// would wait for the next poll. With it, after waking workers for due
// jobs the watch polls again 50ms later, then after each doubling delay
// until max has passed since the wake-up, and wakes them again while jobs
// are still due. It applies to the watch and poll functions. The default
// is 0: the workers fetch with the server's now(), as IHP's and
// examples/worker do. A negative value is an error.
func WithClockSkew(max time.Duration) Option {
	return func(o *options) {
		o.mark(optClockSkew, max < 0, "WithClockSkew(%v): negative", max)
		o.clockSkew = max
	}
}

// WithFleet makes a watch one member of its table's fleet: the processes
// that watch the table (for the same queues) with WithFleet share its
// wake-ups, so that a job wakes one process instead of every one, and one
// fetch query runs per job instead of one per process. It applies to the
// watch functions.
//
// room, when not nil, says how many more jobs the caller can start now
// (its free slots); the wake channel's own room counts too. It is called
// from jobwatch's goroutines for each notification the process
// is chosen for, so it must return at once, typically len and cap of a
// semaphore channel. A process chosen for more jobs than it has room for
// passes the rest to the next process.
//
// Membership is the Listener's: its connection holds an advisory lock
// that pg_locks shows, and only sessions whose role may UPDATE the table
// count. A chosen process that is killed, stopped or cut off leaves its
// jobs to the others: in every 500ms slot, three members look for jobs
// due for 250ms that no one took, and wake for them, so such a job waits
// about 750ms at most. Each process reads the members every 1s to 8s, and
// checks in its slots: one query each for all its tables.
// docs/many-workers.md has the design and the figures.
//
// For a JobTable other than IHP's, the table needs a RunAt column (that
// check reads it); jobs whose RunAt is NULL are not rescued.
func WithFleet(room func() int) Option {
	return func(o *options) {
		o.mark(optFleet, false, "")
		o.fleet, o.room = true, room
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
