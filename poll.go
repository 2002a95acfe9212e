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

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Poller checks a job table for pending jobs at an interval, and at the
// moment the earliest job scheduled for later becomes due. Stop it with
// Close or by cancelling the context it was started with.
type Poller struct {
	pool      *pgxpool.Pool
	names     names
	interval  time.Duration
	opts      options
	query     string
	stats     *counters
	installer *installer // nil for PollForJob without repair
	repair    bool       // check the triggers after each interval poll

	cancel context.CancelFunc
	done   chan struct{}
	kick   chan struct{} // buffered(1): re-read the schedule below

	mu        sync.Mutex
	pollNow   bool
	fallback  time.Duration // when set, the interval while notifications do not arrive
	scheduled time.Time     // when the earliest known future job is due; zero if none
	gateAt    time.Time     // when to check the notify gate next (a light check); zero if not
	trailAt   time.Time     // when to poll again behind the notify gate; zero if not
	gate      gateState     // owned by run
	offset    time.Duration // the server's clock minus ours, as the last poll saw it

	problems problemLog
}

// PollForJob checks tableName every pollInterval plus a random jitter (up to
// 2s by default, see WithJitter) for pending jobs, the first time at once,
// and sends one JobAvailable per pending job, as many as wake has room
// for, never blocking. It also learns when the earliest job scheduled for
// later is due and checks again at that moment, so such a job is woken on
// time rather than at the next interval. A failing poll is logged once
// (and again every few minutes while it keeps failing, and when it works
// again) and polling goes on: a table that does not exist yet, or is
// dropped and recreated, is found when it is there. With repair it also
// installs missing notification triggers, retrying on a backoff of its
// own while it cannot (see WithInstallBackoff), and checks them after each
// interval poll.
//
// It returns an error, and starts nothing, for a nil pool, an invalid table
// name, a nil or unbuffered channel, a poll interval that is not positive
// or an option that does not apply (see Option).
func PollForJob(ctx context.Context, repair bool, pool *pgxpool.Pool, tableName string,
	pollInterval time.Duration, wake chan<- Message, opts ...Option) (*Poller, error) {
	n, o, err := validate("poll", pool, tableName, pollInterval, wake, scopePoll, opts)
	if err != nil {
		return nil, err
	}
	stats := newCounters(n, wake, o)
	var inst *installer
	if repair {
		inst = newInstaller(pool, n, o, stats)
		inst.request(false)
	}
	p := newPoller(pool, n, pollInterval, o, stats, inst, repair)
	p.start(ctx)
	return p, nil
}

// validate checks the arguments the watch and poll functions share.
func validate(step string, pool *pgxpool.Pool, tableName string, pollInterval time.Duration,
	wake chan<- Message, scope optionSet, opts []Option) (names, options, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return n, options{}, fmt.Errorf("jobwatch: %s: %w", step, err)
	}
	o, err := buildOptions(scope, opts)
	switch {
	case err != nil:
	case pool == nil:
		err = ErrNilPool
	case wake == nil:
		err = ErrNilChannel
	case cap(wake) == 0:
		err = ErrUnbufferedChannel
	case pollInterval <= 0:
		err = fmt.Errorf("%w (got %v)", ErrInvalidPollInterval, pollInterval)
	}
	if err != nil {
		return n, o, fmt.Errorf("jobwatch: %s %s: %w", step, tableName, err)
	}
	return n, o, nil
}

// newPoller makes a poller that does nothing until start. It runs inst,
// if any, asks it to check the triggers after each interval poll when
// repair is set, and polls at once when inst has installed them.
func newPoller(pool *pgxpool.Pool, n names, interval time.Duration, o options, stats *counters, inst *installer, repair bool) *Poller {
	table := n.table.quoted()
	p := &Poller{
		pool:      pool,
		names:     n,
		interval:  interval,
		opts:      o,
		stats:     stats,
		repair:    repair && inst != nil,
		installer: inst,
		done:      make(chan struct{}),
		kick:      make(chan struct{}, 1),
		problems:  problemLog{log: o.logger, remind: pollRemind},
		// The limit is the channel's capacity, a constant, so the statement
		// has no parameter and its plan is made once per connection. The
		// server's clock comes along, to place "at:" times on ours.
		query: `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` WHERE ` + pendingNow +
			` LIMIT ` + strconv.Itoa(stats.capacity()) + `) p),
		(SELECT extract(epoch FROM min(run_at) - now())::float8 FROM ` + table + ` WHERE ` + pendingLater + `),
		extract(epoch FROM clock_timestamp())::float8`,
	}
	if inst != nil {
		inst.installed = p.pollSoon
	}
	return p
}

// pollRemind is how often a poll failure that lasts is logged again.
const pollRemind = 5 * time.Minute

// start runs the poller (and its installer) until ctx ends or Close.
func (p *Poller) start(ctx context.Context) {
	ctx, p.cancel = context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { p.run(ctx) })
	if p.installer != nil {
		wg.Go(func() { p.installer.run(ctx) })
	}
	go func() {
		wg.Wait()
		close(p.done)
	}()
}

// Close stops the poller and waits for its goroutines to exit. It is
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
func (p *Poller) Stats() Stats {
	s := p.stats.snapshot()
	s.PollInterval = p.currentInterval()
	return s
}

// currentInterval is the interval polls run at now.
func (p *Poller) currentInterval() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fallback > 0 && p.fallback < p.interval {
		return p.fallback
	}
	return p.interval
}

// pollSoon asks for a poll now.
func (p *Poller) pollSoon() {
	p.mu.Lock()
	p.pollNow = true
	p.mu.Unlock()
	p.signal()
}

// scheduleIn asks for a poll after d unless one is already due sooner.
func (p *Poller) scheduleIn(d time.Duration) { p.setEarlier(&p.scheduled, time.Now().Add(d)) }

// setEarlier sets *t, a time the loop waits for, to at unless it is set
// sooner already, and wakes the loop.
func (p *Poller) setEarlier(t *time.Time, at time.Time) {
	p.mu.Lock()
	if !t.IsZero() && !at.Before(*t) {
		p.mu.Unlock()
		return
	}
	*t = at
	p.mu.Unlock()
	p.signal()
}

// scheduleAt asks for a poll when the server's clock reads t.
func (p *Poller) scheduleAt(t time.Time) {
	p.mu.Lock()
	offset := p.offset
	p.mu.Unlock()
	p.scheduleIn(time.Until(t.Add(-offset)))
}

// setFallback makes the poller poll every d instead of its interval (d 0:
// back to the interval), for while notifications do not arrive.
func (p *Poller) setFallback(d time.Duration) {
	p.mu.Lock()
	changed := p.fallback != d
	p.fallback = d
	p.mu.Unlock()
	if changed {
		p.signal()
	}
}

func (p *Poller) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *Poller) run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastInterval time.Time // when the last interval poll ran
	nextInterval := time.Now()
	for {
		now := time.Now()
		p.mu.Lock()
		if p.fallback > 0 && p.fallback < p.interval && !lastInterval.IsZero() {
			if t := lastInterval.Add(p.fallback); t.Before(nextInterval) {
				nextInterval = t
			}
		}
		reached := func(t time.Time) bool { return !t.IsZero() && !now.Before(t) }
		intervalPoll := !now.Before(nextInterval)
		gateCheck := reached(p.gateAt)
		// A poll called for only behind the gate wakes workers only for
		// what skipped (see poll).
		trailOnly := reached(p.trailAt) && !p.pollNow && !intervalPoll && !reached(p.scheduled)
		due := p.pollNow || intervalPoll || reached(p.scheduled) || reached(p.trailAt)
		if due {
			p.pollNow = false
			for _, t := range []*time.Time{&p.scheduled, &p.trailAt} {
				if reached(*t) {
					*t = time.Time{}
				}
			}
		}
		if gateCheck {
			p.gateAt = time.Time{}
		}
		wakeAt := nextInterval
		for _, t := range []time.Time{p.scheduled, p.trailAt, p.gateAt} {
			if !t.IsZero() && t.Before(wakeAt) {
				wakeAt = t
			}
		}
		fallback := p.fallback
		p.mu.Unlock()

		// The gate's check runs first: the poll that may follow then sees
		// every skipper that had ended when it ran.
		if gateCheck && p.checkGate(ctx) {
			due, trailOnly = true, false
		}
		if due {
			if intervalPoll {
				lastInterval = now
				if fallback > 0 && fallback < p.interval {
					nextInterval = now.Add(fallback)
				} else {
					nextInterval = now.Add(p.interval + p.jitter())
				}
			}
			p.poll(ctx, trailOnly)
			if ctx.Err() != nil {
				return
			}
			// The repair check runs on the interval's polls only, on the
			// installer's goroutine: the extra polls are on a latency path.
			if p.repair && intervalPoll {
				p.installer.request(false)
			}
			continue
		}
		if gateCheck {
			continue // it set the next check
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

func (p *Poller) jitter() time.Duration {
	if p.opts.jitter <= 0 {
		return 0
	}
	return rand.N(p.opts.jitter)
}

// poll counts pending jobs, at most as many as wake can hold, sends one
// JobAvailable per job for which wake has room, and schedules the next
// poll for the earliest future job. A trailing poll (trailOnly: called for
// only by a gated notification) wakes no one unless a transaction skipped
// since the last look: the notification already woke workers for its own
// jobs.
func (p *Poller) poll(ctx context.Context, trailOnly bool) {
	var count int64
	var next *float64
	var server float64
	var open, readable bool
	var skips int64
	start := time.Now()
	var err error
	if p.gate.on {
		err = p.pool.QueryRow(ctx, p.query+`, `+gateColumns, p.gateArgs()...).Scan(&count, &next, &server, &open, &skips, &readable)
	} else {
		err = p.pool.QueryRow(ctx, p.query).Scan(&count, &next, &server)
	}
	end := time.Now()
	// Counted once done, so that a caller who saw Polls go up knows that
	// poll has sent its wake-ups.
	p.stats.polls.Add(1)
	p.stats.pollNanos.Add(int64(end.Sub(start)))
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		p.stats.pollErrors.Add(1)
		p.stats.setError(fmt.Errorf("poll %s: %w", p.names.table.raw, err))
		key := err.Error()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			key = pgErr.Code + pgErr.Message
		}
		p.problems.report(slog.LevelError, key, "jobwatch: poll failed", "table", p.names.table.raw, "error", err)
		return
	}
	p.problems.clear("jobwatch: polling works again", "table", p.names.table.raw)
	// The gate's columns are read after this statement's snapshot was
	// taken: a skipper that committed in between counts as ended, its job
	// unseen. Its skip moved the counter, though: one more poll, whose
	// snapshot comes later, finds it.
	skipped := p.gate.on && p.gateSeen(open, skips)
	if skipped {
		p.setEarlier(&p.trailAt, time.Now().Add(gateTrail))
	}
	serverAt := unixSeconds(server)
	p.mu.Lock()
	p.offset = serverAt.Sub(start.Add(end.Sub(start) / 2))
	p.mu.Unlock()
	// Never more than the channel has room for: a woken worker fetches
	// until nothing is due, so wake-ups beyond that would only be dropped.
	if !trailOnly || skipped {
		p.stats.wake(min(count, p.stats.room()))
	}
	if next != nil {
		p.scheduleIn(seconds(*next))
	}
}
