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

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Poller checks a job table for pending jobs at an interval, and at the
// moment the earliest job scheduled for later becomes due. Stop it with
// Close or by cancelling the context it was started with.
type Poller struct {
	pool      *pgxpool.Pool
	names     names
	shape     *shape // the table's JobTable, as the server read it
	opts      options
	query     string // the poll's query; for a JobTable other than IHP's, built once it is read
	stats     *counters
	installer *installer // nil for PollForJob without repair
	repair    bool       // check the triggers after each interval poll
	fallback  time.Duration
	degraded  func() bool // for a watch: poll every fallback while it holds

	stop     chan struct{} // closed by Close: the loop ends after its query in flight
	done     chan struct{}
	kick     chan struct{} // buffered(1): re-read the schedule
	queryCtx context.Context
	abort    context.CancelFunc // cancels queries in flight, closeGrace after stop

	mu         sync.Mutex
	sched      schedule
	reconnects int           // Listener reconnects not yet caught up on
	offset     time.Duration // the server's clock minus ours, as the last poll saw it
	gate       gateState
	problems   problemLog // the polls'
	// gateProblems says whether this role can read the notify gate's skip
	// counter: a problem of its own, which a good poll does not end.
	gateProblems problemLog
	stopOnce     sync.Once
	// WithClockSkew's polls after a wake-up: until recheckEnd, after a
	// doubling delay, while jobs are due.
	recheck    backoff
	recheckEnd time.Time
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
		fallback:     o.fallbackPoll,
		stop:         make(chan struct{}),
		done:         make(chan struct{}),
		kick:         make(chan struct{}, 1),
		queryCtx:     queryCtx,
		abort:        abort,
		problems:     problemLog{log: o.logger, remind: pollRemind},
		gateProblems: problemLog{log: o.logger, remind: pollRemind},
		recheck:      backoff{min: recheckFirst, max: max(o.clockSkew, recheckFirst)},
	}
	if !n.custom() {
		// The limit is the channel's capacity, a constant, so the statement
		// has no parameter and its plan is made once per connection. The
		// server's clock comes along, to place "at:" times on ours.
		p.query = `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` WHERE ` + pendingNow +
			` LIMIT ` + strconv.Itoa(stats.capacity()) + `) p),
		(SELECT extract(epoch FROM min(run_at) - now())::float8 FROM ` + table + ` WHERE ` + pendingLater + `),
		extract(epoch FROM clock_timestamp())::float8`
	}
	p.sched = schedule{interval: interval, jitter: p.jitter}
	if inst != nil {
		inst.installed = p.pollSoon
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
	s.PollInterval = p.sched.interval
	if f := p.fallbackNow(); f > 0 && f < s.PollInterval {
		s.PollInterval = f
	}
	return s
}

// fallbackNow is the fallback interval when it is in force, else 0: the
// watch is degraded, or cannot read the notify gate's counter.
func (p *Poller) fallbackNow() time.Duration {
	p.mu.Lock()
	blind := p.gate.blind
	p.mu.Unlock()
	if blind || (p.degraded != nil && p.degraded()) {
		return p.fallback
	}
	return 0
}

// followsGate reports whether the poller follows the notify gate.
func (p *Poller) followsGate() bool { return p.gate.on }

// pollSoon asks for a poll now.
func (p *Poller) pollSoon() {
	p.mu.Lock()
	p.sched.pollNow = true
	p.mu.Unlock()
	p.signal()
}

// reconnected asks for one wake-up and a poll now: the Listener
// reconnected, and notifications sent meanwhile are lost. It only
// signals: it runs on the Listener's goroutine.
func (p *Poller) reconnected() {
	p.mu.Lock()
	p.reconnects++
	p.sched.pollNow = true
	p.mu.Unlock()
	p.signal()
}

// scheduleIn asks for a poll after d unless one is already due sooner.
func (p *Poller) scheduleIn(d time.Duration) {
	p.mu.Lock()
	changed := earlier(&p.sched.scheduled, time.Now().Add(d))
	p.mu.Unlock()
	if changed {
		p.signal()
	}
}

// scheduleAt asks for a poll when the server's clock reads t.
func (p *Poller) scheduleAt(t time.Time) {
	p.mu.Lock()
	offset := p.offset
	p.mu.Unlock()
	p.scheduleIn(time.Until(t.Add(-offset)))
}

// signal makes the loop read the schedule again.
func (p *Poller) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *Poller) run() {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		fallback := p.fallbackNow()
		p.mu.Lock()
		st := p.sched.step(time.Now(), fallback)
		reconnects := p.reconnects
		p.reconnects = 0
		p.mu.Unlock()
		if reconnects > 0 {
			// One wake-up: the worker fetches whatever it missed.
			p.stats.wake(1, causeReconnect)
		}
		if st.poll {
			p.poll(st.trailOnly, st.cause)
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
func (p *Poller) poll(trailOnly bool, cause wakeCause) {
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
			err = queryPinned(ctx, p.pool, query, args, dest)
		} else {
			err = p.pool.QueryRow(ctx, query, args...).Scan(dest...)
		}
	}
	end := time.Now()
	// Counted once done, so that a caller who saw Polls go up knows that
	// poll has sent its wake-ups.
	p.stats.queries.Add(1)
	p.stats.polls.Add(1)
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
	p.mu.Lock()
	// The gate's columns are read after this statement's snapshot was
	// taken: a skipper that committed in between counts as ended, its job
	// unseen. Its skip moved the counter, though: one more poll, whose
	// snapshot comes later, finds it.
	var skipped, blindChanged bool
	if p.gate.on {
		skipped, blindChanged = p.gateSeenLocked(open, skips, readable)
	}
	if skipped {
		earlier(&p.sched.trailAt, time.Now().Add(gateTrail))
	}
	p.offset = unixSeconds(server).Sub(start.Add(end.Sub(start) / 2))
	p.mu.Unlock()
	p.logBlind(blindChanged, readable)
	// Never more than the channel has room for: a woken worker fetches
	// until nothing is due, so wake-ups beyond that would only be dropped.
	if trailOnly && skipped {
		cause = causeGate
	}
	if !trailOnly || skipped {
		p.stats.wake(min(count, p.stats.room()), cause)
		p.wokeFor(count)
	}
	if next != nil {
		p.scheduleIn(seconds(*next))
	}
}

// pollQuery returns the poll's statement and arguments: the query, with
// the notify gate's columns when the poller follows it, and for a
// JobTable other than IHP's the queues it watches. It has the server read
// that JobTable first if need be.
func (p *Poller) pollQuery(ctx context.Context) (string, []any, error) {
	var args []any
	if p.gate.on {
		args = p.gateArgs()
	}
	if !p.names.custom() {
		if p.gate.on {
			return p.query + `, ` + gateColumns, args, nil
		}
		return p.query, args, nil
	}
	d, err := p.shape.get(ctx, p.pool, p.names)
	if err != nil {
		return "", nil, err
	}
	queueParam := 0
	if p.gate.on {
		args[1] = d.table // the table as the pinned search_path finds it
	}
	if len(p.opts.queues) > 0 {
		args = append(args, p.opts.queues)
		queueParam = len(args)
	}
	if p.query == "" { // only the poll loop reads and writes it
		p.query = customPollSQL(p.names, d, queueParam, p.stats.capacity())
	}
	if p.gate.on {
		return p.query + `, ` + gateColumns, args, nil
	}
	return p.query, args, nil
}

// customPollSQL is the poll's query for a JobTable other than IHP's: the
// due jobs, counted up to limit, the seconds until the earliest one due
// later, and the server's clock. Parameter $queueParam, when not 0, holds
// the queues to count. It runs on a pinned search_path (queryPinned).
func customPollSQL(n names, d described, queueParam, limit int) string {
	e := jobExprs(n.job)
	where := `(` + d.pred + `)`
	if queueParam > 0 {
		where += ` AND ` + e.queue + ` = ANY ($` + strconv.Itoa(queueParam) + `::text[])`
	}
	table := d.table
	return `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` j WHERE ` + where + ` AND (` + e.dueNow + `) LIMIT ` + strconv.Itoa(limit) + `) p),
		(SELECT extract(epoch FROM min(` + e.dueAt + `) - now())::float8 FROM ` + table + ` j WHERE ` + where + ` AND ` + e.dueLater + `),
		extract(epoch FROM clock_timestamp())::float8`
}

// pinnedSearchPath is the search_path the trigger functions of a JobTable
// other than IHP's run on, and their polls: the server's reading of
// Pending names everything outside pg_catalog with its schema.
const pinnedSearchPath = "pg_catalog, pg_temp"

// queryPinned runs one row's query on pinnedSearchPath, set for its
// transaction only: the pool's own search_path, whatever it holds, picks
// no operator or function of the query (a prepared statement is analysed
// again under the search_path it runs with).
func queryPinned(ctx context.Context, pool *pgxpool.Pool, query string, args, dest []any) error {
	var b pgx.Batch
	b.Queue(`SELECT pg_catalog.set_config('search_path', ` + quoteLiteral(pinnedSearchPath) + `, true)`)
	b.Queue(query, args...).QueryRow(func(row pgx.Row) error { return row.Scan(dest...) })
	return pool.SendBatch(ctx, &b).Close()
}

// recheckFirst is WithClockSkew's first delay.
const recheckFirst = 50 * time.Millisecond

// wokeFor follows a wake-up for count due jobs (count 0: none were due)
// with WithClockSkew's next poll, while its time lasts.
func (p *Poller) wokeFor(count int64) {
	if p.opts.clockSkew <= 0 {
		return
	}
	p.mu.Lock()
	now := time.Now()
	switch {
	case count == 0:
		p.recheckEnd = time.Time{}
	case p.recheckEnd.IsZero() || now.After(p.recheckEnd):
		p.recheckEnd = now.Add(p.opts.clockSkew)
		p.recheck.reset()
		fallthrough
	default:
		if at := now.Add(p.recheck.delay()); now.Before(p.recheckEnd) {
			if at.After(p.recheckEnd) {
				at = p.recheckEnd
			}
			earlier(&p.sched.scheduled, at)
		}
	}
	p.mu.Unlock()
	p.signal()
}
