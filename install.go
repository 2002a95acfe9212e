package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// db is what trigger installation needs: a *pgxpool.Pool or a *pgx.Conn.
type db interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	txBeginner
}

// triggerState is what stateSQL reads from the catalog.
type triggerState struct {
	exists          bool
	schema, owner   string // the table's schema and owner
	counter         string // the skip counter's name, schema-qualified and quoted
	partitioned     bool
	missing         *string // job columns the table lacks
	runAtType       *string
	hasInsert       bool
	insertFires     bool // enabled, or always: not disabled nor replica-only
	hasUpdate       bool
	updateFires     bool
	hasRow          bool // the row trigger of a partitioned table
	rowFires        bool
	uncovered       int // partitions whose statements notify nobody
	incomplete      int // partitions lacking statement triggers or firing the row trigger
	stale           bool
	hasCounter      bool    // the notify gate's skip counter
	counterWritable bool    // PUBLIC may setval it
	foreign         *string // objects under jobwatch's names owned by another role
	healthy         bool    // every statement that leaves a pending job notifies
	inPlace         bool    // current but for stale function bodies
	installed       *string // the record of the description jobwatch's function was made for; nil: IHP's, or none
}

// conflicts reports whether jobwatch's function is in place for a
// description other than d's.
func (s triggerState) conflicts(d described) bool {
	installed := ""
	if s.installed != nil {
		installed = *s.installed
	}
	return s.stale && installed != d.record
}

// installedDescription names, for a log line, the description the
// installed function was made for.
func (s triggerState) installedDescription() string {
	if s.installed == nil {
		return IHPJobTable.String()
	}
	return *s.installed
}

// needsInstall reports whether the install script has work; with bodies,
// a function body that is not this version's counts.
func (s triggerState) needsInstall(bodies bool) bool {
	return !s.inPlace || (bodies && s.stale)
}

// disabled reports whether a trigger exists but does not fire.
func (s triggerState) disabled() bool {
	return (s.hasInsert && !s.insertFires) || (s.hasUpdate && !s.updateFires) || (s.hasRow && !s.rowFires)
}

// what says, for a log line, what needsInstall found.
func (s triggerState) what() string {
	var parts []string
	switch {
	case !s.hasInsert || !s.hasUpdate:
		parts = append(parts, "triggers missing")
	case !s.insertFires || !s.updateFires:
		parts = append(parts, "triggers disabled (ALTER TABLE ... DISABLE TRIGGER, or ENABLE REPLICA TRIGGER)")
	}
	switch {
	case s.partitioned && !s.hasRow:
		parts = append(parts, "partition row trigger missing")
	case s.partitioned && !s.rowFires:
		parts = append(parts, "partition row trigger disabled")
	}
	if s.partitioned && s.incomplete > 0 {
		parts = append(parts, fmt.Sprintf("%d partition(s) whose statement triggers are missing or disabled", s.incomplete))
	}
	if s.stale {
		parts = append(parts, "trigger function from another jobwatch version")
	}
	if !s.hasCounter {
		parts = append(parts, "skip counter missing")
	}
	if s.counterWritable {
		parts = append(parts, "skip counter writable by PUBLIC")
	}
	if s.foreign != nil {
		parts = append(parts, "owned by another role: "+*s.foreign)
	}
	return strings.Join(parts, ", ")
}

// readTriggerState reads what is in place for the table n, described as
// d says (the zero value for IHP's table).
func readTriggerState(ctx context.Context, q db, n names, gate bool, d described) (triggerState, error) {
	var s triggerState
	args := []any{n.table.quoted(), n.statementBody(gate), n.rowBody()}
	if n.custom() {
		args = append(args, d.pred, d.record)
	}
	err := q.QueryRow(ctx, n.stateSQL(gate), args...).Scan(
		&s.schema, &s.owner, &s.counter, &s.partitioned, &s.missing, &s.runAtType,
		&s.hasInsert, &s.insertFires, &s.hasUpdate, &s.updateFires, &s.hasRow, &s.rowFires,
		&s.uncovered, &s.incomplete, &s.stale, &s.hasCounter, &s.counterWritable, &s.foreign,
		&s.healthy, &s.inPlace, &s.installed)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return s, nil
	case err != nil:
		return s, fmt.Errorf("check notification triggers on %s: %w", n.table.raw, err)
	}
	s.exists = true
	return s, nil
}

// sqlError is a PostgreSQL error raised by the install script, printed
// without the "jobwatch: " its message starts with (the Go error has it).
type sqlError struct{ *pgconn.PgError }

func (e sqlError) Error() string {
	return strings.TrimPrefix(e.Message, "jobwatch: ") + " (SQLSTATE " + e.Code + ")"
}

func (e sqlError) Unwrap() error { return e.PgError }

// installTriggers runs the install script, with the partitions' part only
// for a table that may be partitioned, and maps its errors to this
// package's sentinels.
func installTriggers(ctx context.Context, q db, n names, gate, mayPartition bool) error {
	if _, err := q.Exec(ctx, n.triggerSQL(gate, mayPartition)); err != nil {
		return fmt.Errorf("install notification triggers on %s: %w", n.table.raw, mapScriptError(err))
	}
	return nil
}

// mapScriptError maps the errors the scripts of triggers.sql raise to this
// package's sentinels.
func mapScriptError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		sentinel := map[string]error{
			sqlstateUndefinedTable:     ErrTableNotFound,
			sqlstateUndefinedColumn:    ErrMissingColumns,
			sqlstateDatatypeMismatch:   ErrColumnType,
			sqlstateLockNotAvailable:   ErrTriggersBusy,
			sqlstatePermissionDenied:   ErrPermissionDenied,
			sqlstateDuplicateObject:    ErrNameTaken,
			sqlstateInvalidDescription: ErrInvalidJobTable,
		}[pgErr.Code]
		if sentinel != nil {
			return fmt.Errorf("%w: %w", sentinel, sqlError{pgErr})
		}
	}
	return err
}

// NotificationTriggersHealthy reports whether the notification triggers
// are in place: both, insert and update, exist on the table under the
// names this package and IHP derive from tableName (IHP's own per-row
// triggers count), and on a partitioned table every partition's statements
// notify too. It returns an error wrapping ErrTableNotFound when the table
// does not exist. It only reads the catalog.
func NotificationTriggersHealthy(ctx context.Context, pool *pgxpool.Pool, tableName string) (bool, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return false, fmt.Errorf("jobwatch: check notification triggers: %w", err)
	}
	if pool == nil {
		return false, fmt.Errorf("jobwatch: check notification triggers on %s: %w", tableName, ErrNilPool)
	}
	s, err := readTriggerState(ctx, pool, n, false, described{})
	if err != nil {
		return false, fmt.Errorf("jobwatch: %w", err)
	}
	if !s.exists {
		return false, fmt.Errorf("jobwatch: check notification triggers on %s: %w", tableName, ErrTableNotFound)
	}
	return s.healthy, nil
}

// EnsureNotificationTriggers makes the notification triggers of a table
// current: it reads the catalog and, only when a trigger is missing (a
// partition's included) or a function of jobwatch's has another body, runs
// CreateNotificationTriggerSQL's script and logs what it did. When
// everything is current it changes nothing and needs no right beyond
// reading the catalog. It returns an error wrapping ErrTableNotFound,
// ErrMissingColumns, ErrColumnType, ErrTriggersBusy, ErrPermissionDenied
// or ErrInvalidJobTable when those are the cause. Triggers made for
// another description (WithJobTable) are replaced. Options: WithLogger,
// WithNotifyGate, WithJobTable.
func EnsureNotificationTriggers(ctx context.Context, pool *pgxpool.Pool, tableName string, opts ...Option) error {
	n, err := deriveNames(tableName)
	if err != nil {
		return fmt.Errorf("jobwatch: ensure notification triggers: %w", err)
	}
	if pool == nil {
		return fmt.Errorf("jobwatch: ensure notification triggers on %s: %w", tableName, ErrNilPool)
	}
	o, err := buildOptions(scopeTriggers, opts)
	if err == nil {
		n, err = n.describedAs(o.job)
	}
	if err != nil {
		return fmt.Errorf("jobwatch: ensure notification triggers on %s: %w", tableName, err)
	}
	var sh shape
	if _, _, err := ensureTriggers(ctx, pool, n, &sh, o, true, true); err != nil {
		return fmt.Errorf("jobwatch: %w", err)
	}
	return nil
}

// errDescriptionConflict is ensureTriggers' error for triggers made for
// another JobTable, which it was not to replace.
var errDescriptionConflict = errors.New("the notification triggers were made for another job table description")

// ensureTriggers is EnsureNotificationTriggers after validation; bodies says
// whether stale function bodies count, replace whether a function made for
// another description may be replaced. It reports what it installed (""
// if nothing) and whether the triggers notify now (true when that is not
// known, or there is no table).
func ensureTriggers(ctx context.Context, q db, n names, sh *shape, o options, bodies, replace bool) (found string, healthy bool, err error) {
	d, err := sh.get(ctx, q, n)
	if err != nil {
		if errors.Is(err, ErrTableNotFound) {
			err = fmt.Errorf("install notification triggers on %s: %w", n.table.raw, ErrTableNotFound)
		}
		return "", true, err
	}
	s, err := readTriggerState(ctx, q, n, o.gate, d)
	if err != nil {
		return "", true, err // unknown: the polls report the server's trouble
	}
	if !s.exists {
		// No table, no jobs to find faster: the installer's retries find it.
		return "", true, fmt.Errorf("install notification triggers on %s: %w", n.table.raw, ErrTableNotFound)
	}
	if s.conflicts(d) {
		if !replace {
			return "", false, fmt.Errorf("install notification triggers on %s: %w: installed for %s, this watch's is %s",
				n.table.raw, errDescriptionConflict, s.installedDescription(), descriptionOf(n, d))
		}
		o.logger.Warn("jobwatch: replacing notification triggers made for another job table description; "+
			"every process watching the table must describe it alike",
			"table", n.table.raw, "installed", s.installedDescription(), "now", descriptionOf(n, d))
		bodies = true
	}
	if !s.needsInstall(bodies) {
		return "", s.healthy, nil
	}
	if err := installTriggers(ctx, q, n, o.gate, s.partitioned); err != nil {
		return "", s.healthy, err
	}
	level, msg := slog.LevelInfo, "jobwatch: installed notification triggers"
	if s.disabled() {
		// Someone turned them off (a bulk load not undone, a replica's
		// setup): worth a warning, once, as this is a repair.
		level, msg = slog.LevelWarn, "jobwatch: notification triggers were disabled, so nothing was notified; enabled them again"
	}
	o.logger.Log(ctx, level, msg, "table", n.table.raw, "found", s.what())
	return s.what(), true, nil
}

// installer keeps one table's notification triggers installed for a watch
// or a poller with repair. Each check reads the catalog and changes nothing
// when the triggers are current. When they cannot be installed (the table
// does not exist yet, the role lacks the right, a lock is held) it retries
// on a backoff of its own (1s to 30s by default), whatever the poll
// interval, and logs each kind of failure once.
type installer struct {
	pool      *pgxpool.Pool
	names     names
	opts      options
	stats     *counters
	installed func() // after an install that made notifications work: the poller polls now
	changed   func() // unhealthy changed
	problems  problemLog
	unhealthy atomic.Bool // the triggers do not notify and could not be made to
	shape     *shape      // the table's JobTable, as the server read it
	// mayReplace: triggers made for another JobTable may be replaced, by
	// the first check that goes through, never after: two watches
	// describing a table differently do not replace each other in turn.
	mayReplace bool

	kick chan bool // a check is wanted; true: function bodies count
}

// installRemind is how often a failure that lasts is logged again.
const installRemind = 30 * time.Minute

func newInstaller(pool *pgxpool.Pool, n names, sh *shape, o options, stats *counters) *installer {
	return &installer{
		pool: pool, names: n, shape: sh, mayReplace: true, opts: o, stats: stats, installed: func() {}, changed: func() {},
		problems: problemLog{log: o.logger, remind: installRemind},
		kick:     make(chan bool, 1),
	}
}

// request asks for a check soon; with bodies, stale function bodies are
// replaced too (at start and after a reconnect, not on every poll, so that
// two versions running side by side do not replace each other's body
// over and over).
func (i *installer) request(bodies bool) {
	for {
		select {
		case i.kick <- bodies:
			return
		default:
		}
		select {
		case old := <-i.kick: // merge with the pending request
			bodies = bodies || old
		default:
		}
	}
}

// run serves requests and retries until stop is closed; its queries run
// under ctx.
func (i *installer) run(ctx context.Context, stop <-chan struct{}) {
	retry := backoff{min: i.opts.installMin, max: i.opts.installMax}
	var timer <-chan time.Time
	bodies := false
	for {
		select {
		case <-stop:
			return
		case b := <-i.kick:
			bodies = bodies || b
		case <-timer:
		}
		if i.check(ctx, bodies) {
			retry.reset()
			timer = nil
			bodies = false
		} else if ctx.Err() == nil {
			timer = time.After(retry.delay())
		}
	}
}

// check makes the triggers current once and reports whether they are;
// bodies says whether stale function bodies count.
func (i *installer) check(ctx context.Context, bodies bool) bool {
	n := i.names
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, queryTimeout)
	defer cancel()
	found, healthy, err := ensureTriggers(ctx, i.pool, n, i.shape, i.opts, bodies, i.mayReplace)
	if err == nil {
		i.mayReplace = false // the first check that went through, not one a blip cut short
	}
	i.stats.queries.Add(1)
	if found != "" {
		i.stats.queries.Add(1) // the script
	}
	if parent.Err() != nil {
		return true // stopping
	}
	if i.unhealthy.Swap(!healthy) != !healthy {
		i.changed() // the watch polls at its fallback interval while they do not notify
	}
	if err == nil {
		if found != "" {
			i.stats.repairs.Add(1)
			i.installed()
		}
		i.problems.clear("jobwatch: notification triggers in place", "table", n.table.raw)
		return true
	}
	table := n.table.raw
	switch {
	case errors.Is(err, ErrTableNotFound):
		i.stats.setError(err)
		i.problems.report(slog.LevelWarn, "table", "jobwatch: job table does not exist yet; its notification triggers will be installed when it appears",
			"table", table, "retry_up_to", i.opts.installMax)
	case errors.Is(err, ErrPermissionDenied):
		i.stats.setError(err)
		i.problems.report(slog.LevelError, "permission",
			"jobwatch: notification triggers need installing and this role may not: jobs are found by polling only. "+
				"Fix: run jobwatch.CreateNotificationTriggerSQL(table) as the table's owner, in a migration for example",
			"table", table, "error", err)
	case errors.Is(err, ErrNameTaken):
		i.stats.setError(err)
		i.problems.report(slog.LevelError, "taken",
			"jobwatch: notification triggers not installed: another role owns an object under a name they need; jobs are found by polling only. "+
				"Fix: drop it (its owner could change what every INSERT runs), then the watch installs them",
			"table", table, "error", err)
	case errors.Is(err, errDescriptionConflict):
		i.stats.setError(err)
		i.problems.report(slog.LevelError, "conflict",
			"jobwatch: the table's notification triggers were made for another job table description; this watch does not replace them again "+
				"and polls every fallback interval. Fix: give every process watching the table the same WithJobTable",
			"table", table, "error", err)
	case errors.Is(err, ErrInvalidJobTable):
		i.stats.setError(err)
		i.problems.report(slog.LevelError, "invalid",
			"jobwatch: the job table description cannot be watched: nothing installed, no poll runs. Fix: correct WithJobTable",
			"table", table, "error", err)
	case errors.Is(err, ErrTriggersBusy):
		i.problems.passing(slog.LevelInfo, "busy", "jobwatch: notification triggers not installed now (a lock is held), retrying",
			"table", table, "error", err)
	default:
		i.stats.setError(err)
		i.problems.report(slog.LevelError, err.Error(), "jobwatch: cannot install notification triggers, retrying; jobs are found by polling meanwhile",
			"table", table, "error", err)
	}
	return false
}
