package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
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
//
// One goroutine, the poll loop (run), owns the schedule and what the
// poller knows of the notify gate, of the server's clock and of
// WithClockSkew's rechecks: other goroutines (a watch's subscription, the
// Listener, the installer, the gate check) post changes, which the loop
// applies before it plans (post), and the loop decides alone whether it
// polls at its fallback interval (fallbackCause).
type Poller struct {
	pool      *pgxpool.Pool
	names     names
	shape     *shape // the table's JobTable, as the server read it
	opts      options
	stats     *counters
	installer *installer // nil for PollForJob without repair
	repair    bool       // check the triggers after each interval poll
	interval  time.Duration
	fallback  time.Duration // the interval while fallbackCause gives a cause
	watching  bool          // a watch's poller: it polls at its fallback interval while notifications fail it
	monitor   *poolMonitor  // a watch's Listener and pool's; nil for a watch that joined a closed Listener
	fleet     *fleet        // WithFleet: set before start

	stop     chan struct{} // closed by Close: the loop ends after its query in flight
	done     chan struct{}
	kick     chan struct{} // buffered(1): apply the events, plan again
	queryCtx context.Context
	abort    context.CancelFunc // cancels queries in flight, closeGrace after stop
	stopOnce sync.Once

	// The loop's own.
	query      string // the poll's query; for a JobTable other than IHP's, built once it is read
	sched      schedule
	reconnects int           // Listener reconnects not yet caught up on
	offset     time.Duration // the server's clock minus ours, as the last poll saw it
	gate       gateState     // gate.on is set before start, and read by anyone
	recheck    backoff       // WithClockSkew's polls after a wake-up: until recheckEnd,
	recheckEnd time.Time     // after a doubling delay, while jobs are due
	problems   problemLog    // the polls'
	// gateProblems says whether this role can read the notify gate's skip
	// counter: a problem of its own, which a good poll does not end.
	gateProblems problemLog

	mu      sync.Mutex
	events  []func()  // posted, not yet applied
	cause   string    // fallbackCause as the loop last planned with it
	causeAt time.Time // since when
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
	sh := &shape{}
	if err := checkDescription(ctx, pool, n, sh); err != nil {
		return nil, fmt.Errorf("jobwatch: poll %s: %w", tableName, err)
	}
	stats := newCounters(n, wake, o)
	var inst *installer
	if repair {
		inst = newInstaller(pool, n, sh, o, stats)
		inst.request(false)
	}
	p := newPoller(pool, n, sh, pollInterval, o, stats, inst, repair)
	p.start(ctx)
	return p, nil
}

// checkDescription has the server read n's JobTable when the table is
// there, so that the call that starts a watch or poller returns
// ErrInvalidJobTable for one that cannot be watched. Any other failure is
// left to the poller, which reports it and retries.
func checkDescription(ctx context.Context, pool *pgxpool.Pool, n names, sh *shape) error {
	if _, err := sh.get(ctx, pool, n); errors.Is(err, ErrInvalidJobTable) {
		return err
	}
	return nil
}

// validate checks the arguments the watch and poll functions share.
func validate(step string, pool *pgxpool.Pool, tableName string, pollInterval time.Duration,
	wake chan<- Message, scope optionSet, opts []Option) (names, options, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return n, options{}, fmt.Errorf("jobwatch: %s: %w", step, err)
	}
	o, err := buildOptions(scope, opts)
	if err == nil {
		n, err = n.describedAs(o.job)
	}
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
	// Every line a watch or poller logs names its database, as the
	// Listener's do.
	o.logger = o.logger.With("database", pool.Config().ConnConfig.Database)
	return n, o, nil
}

// newPoller makes a poller that does nothing until start. It runs inst,
// if any, asks it to check the triggers after each interval poll when
// repair is set, and polls at once when inst has installed them.
func newPoller(pool *pgxpool.Pool, n names, sh *shape, interval time.Duration, o options, stats *counters, inst *installer, repair bool) *Poller {
	table := n.table.quoted()
	queryCtx, abort := context.WithCancel(context.Background())
	p := &Poller{
		pool:         pool,
		names:        n,
		shape:        sh,
		opts:         o,
		stats:        stats,
		repair:       repair && inst != nil,
		installer:    inst,
		interval:     interval,
		fallback:     o.fallbackPoll,
		stop:         make(chan struct{}),
		done:         make(chan struct{}),
		kick:         make(chan struct{}, 1),
		queryCtx:     queryCtx,
		abort:        abort,
		problems:     problemLog{log: o.logger, remind: pollRemind},
		gateProblems: problemLog{log: o.logger, remind: pollRemind},
		recheck:      backoff{min: recheckFirst, max: max(o.clockSkew, recheckFirst)},
		causeAt:      time.Now(),
	}
	if !n.custom() {
		// The limit is the channel's capacity, a constant, so the statement
		// has no parameter and its plan is made once per connection. The
		// earliest time a job is due later, and the server's clock, to
		// place it and "at:" times on ours.
		p.query = `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` WHERE ` + pendingNow +
			` LIMIT ` + strconv.Itoa(stats.capacity()) + `) p),
		(SELECT extract(epoch FROM min(run_at))::float8 FROM ` + table + ` WHERE ` + pendingLater + `),
		extract(epoch FROM clock_timestamp())::float8`
	}
	p.sched = schedule{interval: interval, jitter: p.jitter}
	if inst != nil {
		inst.installed = p.pollSoon
		inst.changed = p.signal // the loop plans again: fallbackCause reads it
	}
	return p
}

// pollRemind is how often a poll failure that lasts is logged again.
const pollRemind = 5 * time.Minute

// closeGrace is how long Close lets a query in flight finish before it
// cancels it: a cancelled query makes pgx discard its pool connection.
const closeGrace = 2 * time.Second

// queryTimeout bounds every query a poller or installer sends.
const queryTimeout = 30 * time.Second

// start runs the poller (and its installer) until Close, or until ctx
// ends. Its queries do not run under ctx: they finish, within closeGrace,
// so that the caller's pool keeps its connections.
func (p *Poller) start(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(p.run)
	if p.installer != nil {
		wg.Go(func() { p.installer.run(p.queryCtx, p.stop) })
	}
	stopAfter := context.AfterFunc(ctx, p.halt)
	go func() {
		wg.Wait()
		stopAfter()
		p.abort()
		close(p.done)
	}()
}

// halt stops the loops, and cancels what they still run after closeGrace.
func (p *Poller) halt() {
	p.stopOnce.Do(func() {
		close(p.stop)
		time.AfterFunc(closeGrace, p.abort)
	})
}

// Close stops the poller and waits for its goroutines to exit, letting a
// query in flight finish. It is idempotent.
func (p *Poller) Close() error {
	if p == nil {
		return nil
	}
	p.halt()
	<-p.done
	return nil
}

// Done returns a channel that is closed once the poller has stopped.
func (p *Poller) Done() <-chan struct{} { return p.done }

// Stats returns the poller's counters.
func (p *Poller) Stats() Stats {
	s := p.stats.snapshot()
	p.mu.Lock()
	cause, at := p.cause, p.causeAt
	p.mu.Unlock()
	s.PollInterval, s.FallbackCause = p.interval, cause
	if cause != "" && p.fallback < s.PollInterval {
		s.PollInterval = p.fallback
	}
	if p.watching {
		s.NotificationsWorking, s.NotificationsChangedAt = cause == "", at
	}
	if f := p.fleet; f != nil {
		ms, _ := f.members.Load().([]int32)
		rank, _ := f.rank(0)
		s.Fleet = FleetStats{Members: len(ms), Member: rank >= 0, Chosen: f.chosen.Load(), Left: f.left.Load(),
			Passed: f.passed.Load(), Dropped: f.dropped.Load()}
	}
	return s
}

// fallbackCause says why a watch's poller polls at its fallback interval
// rather than its poll interval, "" when it does not: the one place that
// decides it. The loop calls it when it plans.
func (p *Poller) fallbackCause() string {
	if !p.watching {
		return ""
	}
	switch {
	case p.installer.unhealthy.Load():
		return "the triggers do not notify and cannot be made to"
	case p.gate.blind:
		return "the notify gate's skip counter cannot be read"
	case p.monitor == nil:
		return "the Listener was closed"
	}
	if working, _ := p.monitor.state(); !working {
		return "notifications do not reach the Listener"
	}
	return ""
}

// post has the loop apply change before it plans again: the one way other
// goroutines change the loop's state. It never waits for the loop.
func (p *Poller) post(change func()) {
	p.mu.Lock()
	p.events = append(p.events, change)
	p.mu.Unlock()
	p.signal()
}

// pollSoon asks for a poll now.
func (p *Poller) pollSoon() { p.post(func() { p.sched.pollNow = true }) }

// reconnected asks for one wake-up and a poll now: the Listener
// reconnected, and notifications sent meanwhile are lost. It runs on the
// Listener's goroutine.
func (p *Poller) reconnected() {
	p.post(func() {
		p.reconnects++
		p.sched.pollNow = true
	})
}

// scheduleAt asks for a poll when the server's clock reads t.
func (p *Poller) scheduleAt(t time.Time) {
	p.post(func() { earlier(&p.sched.scheduled, t.Add(-p.offset)) })
}

// signal makes the loop apply the events and plan again.
func (p *Poller) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// plan applies the posted events and decides the fallback interval: in
// force (returned) when fallbackCause gives a cause, else 0. A change of
// cause is published for Stats.
func (p *Poller) plan() time.Duration {
	p.mu.Lock()
	events := p.events
	p.events = nil
	p.mu.Unlock()
	for _, e := range events {
		e()
	}
	cause := p.fallbackCause()
	p.mu.Lock()
	if cause != p.cause {
		p.cause, p.causeAt = cause, time.Now()
	}
	p.mu.Unlock()
	if cause == "" {
		return 0
	}
	return p.fallback
}

func (p *Poller) run() {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		st := p.sched.step(time.Now(), p.plan())
		reconnects := p.reconnects
		p.reconnects = 0
		if reconnects > 0 {
			// One wake-up: the worker fetches whatever it missed.
			p.stats.wake(1, causeReconnect)
		}
		if st.poll {
			p.poll(st.trailOnly, st.recheck, st.cause)
			if p.stopped() {
				return
			}
			// The repair check runs on the interval's polls only, on the
			// installer's goroutine: the others are on a latency path.
			if p.repair && st.interval {
				p.installer.request(false)
			}
			continue
		}
		timer.Reset(time.Until(st.wakeAt))
		select {
		case <-p.stop:
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

func (p *Poller) stopped() bool {
	select {
	case <-p.stop:
		return true
	default:
		return false
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
func (p *Poller) poll(trailOnly, recheck bool, cause wakeCause) {
	var count int64
	var next *float64
	var server float64
	var open, readable bool
	var skips int64
	ctx, cancel := context.WithTimeout(p.queryCtx, queryTimeout)
	defer cancel()
	start := time.Now()
	query, args, err := p.pollQuery(ctx)
	dest := []any{&count, &next, &server}
	if p.gate.on {
		dest = append(dest, &open, &skips, &readable)
	}
	if err == nil {
		if p.names.custom() {
			err = queryPinned(ctx, p.pool, query, dest...)
		} else {
			err = p.pool.QueryRow(ctx, query, args...).Scan(dest...)
		}
	}
	end := time.Now()
	// Counted once done, so that a caller who saw Polls go up knows that
	// poll has sent its wake-ups.
	defer p.stats.polls.Add(1)
	p.stats.queries.Add(1)
	p.stats.pollNanos.Add(int64(end.Sub(start)))
	if err != nil {
		if p.stopped() {
			return
		}
		p.stats.pollErrors.Add(1)
		p.stats.setError(fmt.Errorf("poll %s: %w", p.names.table.raw, err))
		key, level := err.Error(), slog.LevelError
		var pgErr *pgconn.PgError
		if errors.Is(err, ErrInvalidJobTable) && p.installer != nil {
			level = slog.LevelDebug // the installer says it, once
		} else if errors.As(err, &pgErr) {
			key = pgErr.Code + pgErr.Message
			if pgErr.Code == sqlstateUndefinedTable {
				// A table that is not there yet: a warning, said by the
				// installer when there is one.
				level = slog.LevelWarn
				if p.installer != nil {
					level = slog.LevelDebug
				}
			}
		}
		p.problems.report(level, key, "jobwatch: poll failed", "table", p.names.table.raw, "error", err)
		return
	}
	p.problems.clear("jobwatch: polling works again", "table", p.names.table.raw)
	// The gate's columns are read after this statement's snapshot was
	// taken: a skipper that committed in between counts as ended, its job
	// unseen. Its skip moved the counter, though: one more poll, whose
	// snapshot comes later, finds it.
	skipped := p.gate.on && p.gateSeen(open, skips, readable)
	if skipped {
		earlier(&p.sched.trailAt, time.Now().Add(gateTrail))
	}
	p.offset = unixSeconds(server).Sub(start.Add(end.Sub(start) / 2))
	// Never more than the channel has room for: a woken worker fetches
	// until nothing is due, so wake-ups beyond that would only be dropped.
	if trailOnly && skipped {
		cause = causeGate
	}
	if !trailOnly || skipped {
		room := p.stats.room()
		if p.fleet != nil {
			room = p.fleet.roomFor(p.stats)
			// What a poll that one process makes for the fleet finds
			// beyond this one's room goes to another member.
			if count > room && (cause == causeGate || cause == causeScheduled) {
				p.fleet.passExcess(count - room)
			}
		}
		p.stats.wake(min(count, room), cause)
		p.wokeFor(count, recheck)
	}
	// In a fleet, the member chosen for that time polls then: every
	// member's polls find it.
	if next != nil && p.fleet.chosenFor(math.Float64bits(*next)) {
		earlier(&p.sched.scheduled, time.Now().Add(seconds(*next-server)))
	}
}

// pollQuery returns the poll's statement and arguments: the query, with
// the notify gate's columns when the poller follows it, and for a
// JobTable other than IHP's the queues it watches. It has the server read
// that JobTable first if need be.
func (p *Poller) pollQuery(ctx context.Context) (string, []any, error) {
	if !p.names.custom() {
		if p.gate.on {
			return p.query + `, ` + gateColumns, p.gateArgs(), nil
		}
		return p.query, nil, nil
	}
	if p.query == "" { // only the poll loop reads and writes it
		d, err := p.shape.get(ctx, p.pool, p.names)
		if err != nil {
			return "", nil, err
		}
		p.query = customPollSQL(p.names, d, p.opts.queues, p.stats.capacity())
		if p.gate.on {
			// The table as the pinned search_path finds it.
			p.query += `, ` + gateColumnsOf(strconv.FormatInt(p.names.skipKey, 10)+"::int8", quoteLiteral(d.table), quoteLiteral(p.names.counter))
		}
	}
	return p.query, nil, nil
}

// recheckFirst is WithClockSkew's first delay.
const recheckFirst = 50 * time.Millisecond

// wokeFor follows a wake-up for count due jobs (count 0: none were due)
// with WithClockSkew's next poll, while its window lasts: a wake-up opens
// a window of max skew, unless it came from a recheck, whose finding
// never opens a new one. The loop calls it; others post it.
func (p *Poller) wokeFor(count int64, fromRecheck bool) {
	if p.opts.clockSkew <= 0 {
		return
	}
	now := time.Now()
	open := !p.recheckEnd.IsZero() && now.Before(p.recheckEnd)
	switch {
	case count == 0:
		p.recheckEnd = time.Time{}
		return
	case !open && fromRecheck:
		return
	case !open:
		p.recheckEnd = now.Add(p.opts.clockSkew)
		p.recheck.reset()
	}
	at := now.Add(p.recheck.delay())
	if at.After(p.recheckEnd) {
		at = p.recheckEnd
	}
	earlier(&p.sched.recheckAt, at)
}
