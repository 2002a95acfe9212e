package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Errors returned (wrapped) for bad arguments to PollForJob and the watch
// functions.
var (
	// ErrNilChannel is returned for a nil wake channel.
	ErrNilChannel = errors.New("nil wake channel")
	// ErrUnbufferedChannel is returned for a wake channel without a buffer:
	// the library never blocks on it, so an unbuffered channel would drop
	// nearly every wake-up.
	ErrUnbufferedChannel = errors.New("unbuffered wake channel")
	// ErrInvalidPollInterval is returned for a poll interval of zero or less.
	ErrInvalidPollInterval = errors.New("poll interval must be positive")
)

// pendingCondition is the spec's definition of a job that can run now.
const pendingCondition = `status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()`

// Poller checks a job table for pending jobs at an interval, and at the
// moment the earliest job scheduled for later becomes due. Stop it with
// Close or by cancelling the context it was started with.
type Poller struct {
	pool     *pgxpool.Pool
	names    names
	interval time.Duration
	wake     chan<- Message
	repair   bool
	opts     options
	log      *slog.Logger
	query    string

	cancel context.CancelFunc
	done   chan struct{}
	kick   chan struct{} // buffered(1): re-read pollNow/scheduled

	mu        sync.Mutex
	pollNow   bool
	scheduled time.Time // when the earliest known future job is due; zero if none
	trailAt   time.Time // when to look for jobs whose notification the gate skipped; zero if not

	stats *counters
}

// PollForJob checks tableName every pollInterval plus a random jitter (up to
// 2s by default, see WithJitter) for pending jobs, the first time at once,
// and sends one JobAvailable per pending job, as many as wake has room
// for, never blocking. It also learns when the earliest job scheduled for
// later is due and checks again at that moment, so such a job is woken on
// time rather than at the next interval. Errors are logged and polling
// goes on (a dropped and recreated table recovers by itself). With repair,
// it re-creates missing notification triggers after each interval poll.
//
// It returns an error, and starts nothing, for a nil pool, an invalid table
// name, a nil or unbuffered channel or a poll interval that is not positive.
func PollForJob(ctx context.Context, repair bool, pool *pgxpool.Pool, tableName string,
	pollInterval time.Duration, wake chan<- Message, opts ...Option) (*Poller, error) {
	n, err := validate(pool, tableName, pollInterval, wake)
	if err != nil {
		return nil, err
	}
	o := buildOptions(opts)
	return startPoller(ctx, repair, pool, n, pollInterval, wake, o, newCounters(n, wake, o)), nil
}

func validate(pool *pgxpool.Pool, tableName string, pollInterval time.Duration, wake chan<- Message) (names, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return n, fmt.Errorf("jobwatch: %w", err)
	}
	switch {
	case pool == nil:
		return n, fmt.Errorf("jobwatch: watch %s: %w", tableName, ErrNilPool)
	case wake == nil:
		return n, fmt.Errorf("jobwatch: watch %s: %w", tableName, ErrNilChannel)
	case cap(wake) == 0:
		return n, fmt.Errorf("jobwatch: watch %s: %w", tableName, ErrUnbufferedChannel)
	case pollInterval <= 0:
		return n, fmt.Errorf("jobwatch: watch %s: %w (got %v)", tableName, ErrInvalidPollInterval, pollInterval)
	}
	return n, nil
}

func startPoller(ctx context.Context, repair bool, pool *pgxpool.Pool, n names, interval time.Duration,
	wake chan<- Message, o options, stats *counters) *Poller {
	ctx, cancel := context.WithCancel(ctx)
	table := n.table.quoted()
	p := &Poller{
		pool:     pool,
		names:    n,
		interval: interval,
		wake:     wake,
		repair:   repair,
		opts:     o,
		log:      o.logger,
		cancel:   cancel,
		done:     make(chan struct{}),
		kick:     make(chan struct{}, 1),
		stats:    stats,
		// The limit is the channel's capacity, a constant, so the statement
		// has no parameter and its plan is made once per connection.
		query: `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` WHERE ` + pendingCondition +
			` LIMIT ` + strconv.Itoa(cap(wake)) + `) p),
		(SELECT extract(epoch FROM min(run_at) - now())::float8 FROM ` + table + `
		  WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at > now())`,
	}
	go p.run(ctx)
	return p
}

// Close stops the poller and waits for its goroutine to exit. It is
// idempotent.
func (p *Poller) Close() error {
	if p == nil {
		return nil
	}
	p.cancel()
	<-p.done
	return nil
}

// Done returns a channel that is closed once the poller has stopped.
func (p *Poller) Done() <-chan struct{} { return p.done }

// Stats returns the poller's counters.
func (p *Poller) Stats() Stats { return p.stats.snapshot() }

// pollSoon asks for a poll now.
func (p *Poller) pollSoon() {
	p.mu.Lock()
	p.pollNow = true
	p.mu.Unlock()
	p.signal()
}

// scheduleIn asks for a poll after d unless one is already due sooner.
func (p *Poller) scheduleIn(d time.Duration) {
	at := time.Now().Add(d)
	p.mu.Lock()
	if !p.scheduled.IsZero() && !at.Before(p.scheduled) {
		p.mu.Unlock()
		return
	}
	p.scheduled = at
	p.mu.Unlock()
	p.signal()
}

func (p *Poller) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *Poller) run(ctx context.Context) {
	defer close(p.done)
	timer := time.NewTimer(0)
	defer timer.Stop()
	nextInterval := time.Now()
	for {
		now := time.Now()
		p.mu.Lock()
		reached := func(t time.Time) bool { return !t.IsZero() && !now.Before(t) }
		intervalPoll := !now.Before(nextInterval)
		trailing := reached(p.trailAt)
		due := p.pollNow || intervalPoll || trailing || reached(p.scheduled)
		if due {
			p.pollNow = false
			p.scheduled = time.Time{}
			if trailing {
				p.trailAt = time.Time{}
			}
		}
		wakeAt := nextInterval
		for _, t := range []time.Time{p.scheduled, p.trailAt} {
			if !t.IsZero() && t.Before(wakeAt) {
				wakeAt = t
			}
		}
		p.mu.Unlock()

		if due {
			if intervalPoll {
				nextInterval = now.Add(p.interval + p.jitter())
			}
			if trailing && p.skippersOpen(ctx) {
				// A transaction that skipped its notification is still
				// open: look again after it may have committed.
				p.trailIn(trailDelay)
			}
			p.poll(ctx)
			if ctx.Err() != nil {
				return
			}
			// Repair on the interval's polls only: the extra ones (a job
			// falling due, a reconnect) are on a latency path.
			if p.repair && intervalPoll {
				p.repairTriggers(ctx)
			}
			continue
		}

		timer.Reset(time.Until(wakeAt))
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-p.kick:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		}
	}
}

// trailDelay is how long after a gated notification (see WithNotifyGate)
// the poller looks for jobs of transactions that skipped theirs, and how
// often it looks again while such a transaction is open.
const trailDelay = 5 * time.Millisecond

// trailIn asks for a trailing poll after d unless one is due sooner.
func (p *Poller) trailIn(d time.Duration) {
	at := time.Now().Add(d)
	p.mu.Lock()
	if !p.trailAt.IsZero() && !at.Before(p.trailAt) {
		p.mu.Unlock()
		return
	}
	p.trailAt = at
	p.mu.Unlock()
	p.signal()
}

// skippersOpen reports whether a transaction that skipped its notification
// under the notify gate is still open: such transactions hold the gate's
// skip key in shared mode, so an exclusive try fails while any is open.
// It runs before the poll's own statement, whose snapshot then sees every
// such transaction that had ended.
func (p *Poller) skippersOpen(ctx context.Context) bool {
	var free bool
	err := p.pool.QueryRow(ctx, `SELECT CASE WHEN pg_try_advisory_lock(`+gateSkipKey+`, hashtext($1))
		THEN pg_advisory_unlock(`+gateSkipKey+`, hashtext($1)) ELSE false END`, p.names.channel).Scan(&free)
	if err != nil {
		return true // cannot tell: look again
	}
	return !free
}

func (p *Poller) jitter() time.Duration {
	if p.opts.jitter <= 0 {
		return 0
	}
	return rand.N(p.opts.jitter)
}

// poll counts pending jobs, at most as many as wake can hold, sends one
// JobAvailable per job for which wake has room, and schedules the next poll for the earliest future job.
func (p *Poller) poll(ctx context.Context) {
	p.stats.polls.Add(1)
	var count int64
	var next *float64
	start := time.Now()
	err := p.pool.QueryRow(ctx, p.query).Scan(&count, &next)
	p.stats.pollNanos.Add(int64(time.Since(start)))
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		p.stats.pollErrors.Add(1)
		p.stats.setError(err)
		p.log.Error("jobwatch: poll failed", "table", p.names.table.raw, "error", err)
		return
	}
	// Never more than the channel has room for: a woken worker fetches
	// until nothing is due, so wake-ups beyond that would only be dropped.
	p.stats.wake(min(count, int64(cap(p.wake)-len(p.wake))))
	if next != nil {
		p.scheduleIn(time.Duration(*next * float64(time.Second)))
	}
}

func (p *Poller) repairTriggers(ctx context.Context) {
	installed, err := ensureTriggers(ctx, p.pool, p.names, p.opts)
	switch {
	case err == nil:
		if installed {
			p.stats.repairs.Add(1)
		}
	case ctx.Err() != nil:
	case errors.Is(err, ErrTriggersBusy):
		p.log.Info("jobwatch: trigger repair deferred", "table", p.names.table.raw, "error", err)
	default:
		p.stats.setError(err)
		p.log.Error("jobwatch: trigger repair failed", "table", p.names.table.raw, "error", err)
	}
}
