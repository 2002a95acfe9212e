package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Status is how one check of Diagnose came out.
type Status int

const (
	StatusOK   Status = iota // nothing to do
	StatusWarn               // works, but not as well as it could, or soon may not
	StatusFail               // workers are not woken, or will not be
)

// String returns "OK", "WARN" or "FAIL".
func (s Status) String() string {
	switch s {
	case StatusOK:
		return "OK"
	case StatusWarn:
		return "WARN"
	}
	return "FAIL"
}

// Finding is the outcome of one check of Diagnose.
type Finding struct {
	Check  string // what was checked: server, table, triggers, privileges, index, jobs, notify queue, delivery
	Status Status
	Detail string // what was found
	Fix    string // what to do; empty for StatusOK
	// Err is the error that kept the check from looking (a query that
	// failed: the server did not answer, a right is missing); nil when
	// it looked.
	Err error
}

// Diagnose runs, for one job table, every check this package knows for why
// workers may not be woken, and returns one Finding per check, in this
// order:
//
//   - server: the pool reaches a primary (not a standby);
//   - table: it exists, with status, locked_by and a timestamp run_at;
//   - triggers: present (on every partition too), and their function the
//     one this version installs;
//   - privileges: whether the pool's role can install the triggers;
//   - index: the recommended partial index on pending jobs;
//   - jobs: how many are due and scheduled, and how long the oldest due
//     one has waited;
//   - notify queue: pg_notification_queue_usage(), since a full queue makes
//     every NOTIFY, so every INSERT, fail;
//   - delivery: a NOTIFY sent through the pool reaches a LISTEN opened on
//     listenerConnString (the Listener's connection string), the delivery
//     check a Listener runs (see WithDeliveryCheck), which catches a
//     transaction-mode pooler, two different databases and a standby.
//
// It only reads, except for that one NOTIFY, on a private channel that no
// worker listens to. It returns an error for a nil pool, an invalid table
// name or an unparsable connection string, and, with the findings so far,
// one wrapping ctx's error when ctx ends before every check ran (a probe
// cut short proves nothing about the delivery). A server that cannot be
// reached is a failed check, with its error in Finding.Err.
//
// With WithJobTable, the table check is that the server accepts the
// description, and the triggers check fails when they were made for
// another one; the index advice is IHP's table's only.
func Diagnose(ctx context.Context, pool *pgxpool.Pool, listenerConnString, tableName string, opts ...Option) ([]Finding, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return nil, fmt.Errorf("jobwatch: diagnose: %w", err)
	}
	if pool == nil {
		return nil, fmt.Errorf("jobwatch: diagnose %s: %w", tableName, ErrNilPool)
	}
	o, err := buildOptions(scopeDiagnose, opts)
	if err == nil {
		n, err = n.describedAs(o.job)
	}
	if err != nil {
		return nil, fmt.Errorf("jobwatch: diagnose %s: %w", tableName, err)
	}
	l, err := parseListener(listenerConnString, []Option{WithLogger(slog.New(slog.DiscardHandler)),
		WithHealthCheck(0, 0), WithDeliveryCheck(0, defaultDeliveryTimeout)})
	if err != nil {
		return nil, fmt.Errorf("jobwatch: diagnose %s: %w", tableName, err)
	}
	defer l.Close()

	d := diagnosis{pool: pool, names: n}
	if d.server(ctx) {
		if d.table(ctx) {
			current := d.triggers(ctx)
			d.privileges(ctx, current)
			d.index(ctx)
			d.jobs(ctx)
		}
		d.queue(ctx)
	}
	d.delivery(ctx, l)
	if err := ctx.Err(); err != nil {
		return d.findings, fmt.Errorf("jobwatch: diagnose %s: not every check ran: %w", tableName, err)
	}
	return d.findings, nil
}

// diagnosis collects the findings of Diagnose.
type diagnosis struct {
	pool     *pgxpool.Pool
	names    names
	state    triggerState // read by table
	desc     described    // read by table
	findings []Finding
}

func (d *diagnosis) add(check string, status Status, detail, fix string) {
	d.findings = append(d.findings, Finding{Check: check, Status: status, Detail: detail, Fix: fix})
}

// failed records a check that could not look, because of err.
func (d *diagnosis) failed(check, detail string, err error, fix string) {
	d.findings = append(d.findings, Finding{Check: check, Status: StatusFail, Detail: detail + err.Error(), Fix: fix, Err: err})
}

func (d *diagnosis) tableExpr() string {
	return "to_regclass(" + quoteLiteral(d.names.table.quoted()) + ")"
}

func (d *diagnosis) installFix() string {
	return "run jobwatch.CreateNotificationTriggerSQL(" + fmt.Sprintf("%q", d.names.table.raw) +
		") as the table's owner (`jobwatch sql TABLE | psql`), or start a worker whose role may"
}

// server reports whether the pool reaches a server at all.
func (d *diagnosis) server(ctx context.Context) bool {
	var version, database string
	var recovery bool
	err := d.pool.QueryRow(ctx, "SELECT current_setting('server_version'), current_database(), pg_is_in_recovery()").
		Scan(&version, &database, &recovery)
	switch {
	case err != nil:
		d.failed("server", "cannot query through the pool: ", err, "check the connection string and that the server runs")
		return false
	case recovery:
		d.add("server", StatusFail, fmt.Sprintf("PostgreSQL %s, database %s, is a standby in recovery: jobs cannot be inserted or fetched there", version, database),
			"point the pool at the primary (several hosts with target_session_attrs=read-write follow it)")
	default:
		d.add("server", StatusOK, fmt.Sprintf("PostgreSQL %s, database %s, a primary", version, database), "")
	}
	return true
}

// table reports whether the table exists with the job columns, and keeps
// the state of its triggers (as this version's gated triggers) for the
// checks that follow.
func (d *diagnosis) table(ctx context.Context) bool {
	raw := d.names.table.raw
	if d.names.custom() {
		return d.customTable(ctx)
	}
	s, err := readTriggerState(ctx, d.pool, d.names, true, described{})
	d.state = s
	switch {
	case err != nil:
		d.failed("table", "cannot read the catalog: ", err, "")
		return false
	case !s.exists:
		d.add("table", StatusFail, raw+" does not exist", "create it: jobwatch.CreateJobTableSQL gives IHP's schema")
		return false
	case s.missing != nil:
		d.add("table", StatusFail, raw+" lacks column(s) "+*s.missing, "add them: status, run_at (a timestamp) and locked_by")
		return false
	case !isRunAtType(*s.runAtType):
		d.add("table", StatusFail, raw+": run_at is "+*s.runAtType+", the triggers need a timestamp", "make run_at a timestamptz")
		return false
	}
	shape := "a table"
	if s.partitioned {
		shape = "a partitioned table"
	}
	d.add("table", StatusOK, fmt.Sprintf("%s is %s in schema %s, owned by %s, with status, locked_by and run_at (%s)",
		raw, shape, s.schema, s.owner, *s.runAtType), "")
	return true
}

// customTable is table for a JobTable other than IHP's: the server reads
// it against the table.
func (d *diagnosis) customTable(ctx context.Context) bool {
	raw := d.names.table.raw
	var sh shape
	desc, err := sh.get(ctx, d.pool, d.names)
	switch {
	case errors.Is(err, ErrTableNotFound):
		d.add("table", StatusFail, raw+" does not exist", "create it")
		return false
	case errors.Is(err, ErrInvalidJobTable):
		d.add("table", StatusFail, "the job table description cannot be watched: "+err.Error(), "correct WithJobTable (jobwatch doctor's -pending, -run-at, -run-at-zone, -queue)")
		return false
	case err != nil:
		d.failed("table", "cannot read the description against the table: ", err, "")
		return false
	}
	d.desc = desc
	s, err := readTriggerState(ctx, d.pool, d.names, true, desc)
	d.state = s
	if err != nil {
		d.failed("table", "cannot read the catalog: ", err, "")
		return false
	}
	d.add("table", StatusOK, fmt.Sprintf("%s is %s in schema %s, owned by %s, described as %s",
		raw, map[bool]string{false: "a table", true: "a partitioned table"}[s.partitioned], s.schema, s.owner, desc.record), "")
	return true
}

// triggers checks the triggers and reports whether they are current.
func (d *diagnosis) triggers(ctx context.Context) bool {
	s, gated := d.state, true
	if s.conflicts(d.desc) {
		d.add("triggers", StatusFail, "made for another job table description: "+s.installedDescription()+
			"; this one is "+descriptionOf(d.names, d.desc)+": watches with this description poll instead of being notified",
			"give every process the same WithJobTable, and run the migration for it (jobwatch sql TABLE with the description)")
		return false
	}
	if s.stale {
		if g, err := readTriggerState(ctx, d.pool, d.names, false, d.desc); err == nil && !g.stale {
			s, gated = g, false
		}
	}
	switch {
	case s.foreign != nil:
		d.add("triggers", StatusFail, "objects under jobwatch's names are owned by another role: "+*s.foreign,
			"drop them (their owner could change what every INSERT runs), then install the triggers again")
		return false
	case !s.healthy:
		d.add("triggers", StatusFail, "statements that leave pending jobs notify nobody: "+s.what(), d.installFix())
		return false
	case s.stale:
		d.add("triggers", StatusWarn, "in place, but the trigger function is from another jobwatch version", d.installFix())
		return false
	case s.partitioned && s.incomplete > 0:
		d.add("triggers", StatusWarn, fmt.Sprintf("in place; %d partition(s) still notify through the row trigger, once per row", s.incomplete),
			d.installFix()+" (a watch with repair does it after its next interval poll)")
		return false
	case gated && (!s.hasCounter || s.counterWritable):
		d.add("triggers", StatusWarn, "in place; "+s.what(), d.installFix())
		return false
	}
	detail := "insert and update triggers in place and enabled, current"
	if s.partitioned {
		detail += ", on every partition"
	}
	if !gated {
		detail += ", without the notify gate"
	}
	d.add("triggers", StatusOK, detail, "")
	return true
}

// privileges says whether the pool's role can install the triggers; that
// it cannot is a failure only when they need installing.
func (d *diagnosis) privileges(ctx context.Context, current bool) {
	// As the install script does it: a superuser may; the owner, or a
	// member of the owning role, needs CREATE on the schema, and when it
	// is not the owner, so does the owner it hands the objects to.
	var can bool
	err := d.pool.QueryRow(ctx, `SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
		OR (pg_has_role(c.relowner, 'USAGE') AND has_schema_privilege(c.relnamespace, 'CREATE')
		    AND (c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
		         OR has_schema_privilege(c.relowner, c.relnamespace, 'CREATE')))
		FROM pg_class c WHERE c.oid = `+d.tableExpr()).Scan(&can)
	switch {
	case err != nil:
		d.failed("privileges", "cannot read the catalog: ", err, "")
	case can:
		d.add("privileges", StatusOK, "this role can install and repair the triggers", "")
	case current:
		d.add("privileges", StatusOK, "this role cannot install the triggers, and need not: they are installed (by a migration)", "")
	default:
		d.add("privileges", StatusFail, "this role cannot install the triggers (it must be a superuser, or own the table or be a member of its owner, "+
			"with CREATE on its schema)", d.installFix())
	}
}

func (d *diagnosis) index(ctx context.Context) {
	if d.names.custom() {
		d.add("index", StatusOK, "not checked: the advice is for IHP's table; for this one, a partial index on its due column WHERE its Pending condition serves polls and fetches", "")
		return
	}
	var found bool
	err := d.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = `+d.tableExpr()+`
		AND pg_get_expr(i.indpred, i.indrelid) LIKE '%job_status_not_started%'
		AND pg_get_expr(i.indpred, i.indrelid) LIKE '%locked_by IS NULL%')`).Scan(&found)
	switch {
	case err != nil:
		d.failed("index", "cannot read the catalog: ", err, "")
	case found:
		d.add("index", StatusOK, "a partial index on pending jobs", "")
	default:
		d.add("index", StatusWarn, "no partial index on pending jobs: each poll and fetch reads every pending row's page",
			pendingIndexSQL(d.names))
	}
}

// jobsWaitWarn is how long a due job may wait before Diagnose warns.
const jobsWaitWarn = time.Minute

func (d *diagnosis) jobs(ctx context.Context) {
	var due, later, never int64
	var oldest *float64
	t := d.names.table.quoted()
	var err error
	if d.names.custom() {
		t = d.desc.table
		e := jobExprs(d.names.job)
		err = queryPinned(ctx, d.pool, `SELECT count(*) FILTER (WHERE `+e.dueNow+`), count(*) FILTER (WHERE `+e.dueLater+`),
		count(*) FILTER (WHERE `+e.dueAt+` = 'infinity'),
		extract(epoch FROM now() - min(`+e.dueAt+`) FILTER (WHERE `+e.dueAt+` <= now() AND `+e.dueAt+` > '-infinity'))::float8
		FROM `+t+` j WHERE `+d.desc.pred, &due, &later, &never, &oldest)
	} else {
		err = d.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE run_at <= now()),
		count(*) FILTER (WHERE run_at > now() AND run_at < 'infinity'), count(*) FILTER (WHERE run_at = 'infinity'),
		extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now() AND run_at > '-infinity'))::float8
		FROM `+t+` WHERE `+pendingIndexPredicate).Scan(&due, &later, &never, &oldest)
	}
	if err != nil {
		d.failed("jobs", "cannot count them: ", err, "")
		return
	}
	detail := fmt.Sprintf("%d due now, %d scheduled for later", due, later)
	if never > 0 {
		detail += fmt.Sprintf(", %d never (run_at = 'infinity')", never)
	}
	if oldest == nil {
		d.add("jobs", StatusOK, detail, "")
		return
	}
	wait := seconds(*oldest).Round(time.Millisecond)
	detail += fmt.Sprintf("; the oldest due job has waited %v", wait)
	if wait > jobsWaitWarn {
		d.add("jobs", StatusWarn, detail, "workers are not keeping up, or not running, or not woken: see their logs and the checks above")
		return
	}
	d.add("jobs", StatusOK, detail, "")
}

func (d *diagnosis) queue(ctx context.Context) {
	var usage float64
	if err := d.pool.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage); err != nil {
		d.failed("notify queue", "cannot read it: ", err, "")
		return
	}
	detail := fmt.Sprintf("%.2f%% used", 100*usage)
	fix := "a session that LISTENs is not reading its notifications (an idle transaction holds the queue too): the server log names it"
	switch {
	case usage >= 0.5:
		d.add("notify queue", StatusFail, detail+": when it is full, every NOTIFY, and so every INSERT of a job, fails", fix)
	case usage >= 0.01:
		d.add("notify queue", StatusWarn, detail, fix)
	default:
		d.add("notify queue", StatusOK, detail, "")
	}
}

// delivery runs the delivery check's probe, twice at most, through a
// Listener of its own on the Listener's connection string.
func (d *diagnosis) delivery(ctx context.Context, l *Listener) {
	const fix = "point the Listener at the primary, directly or through a session-mode pool"
	c := newDeliveryCheck(l, d.pool, defaultDeliveryTimeout)
	if err := c.listen(ctx); err != nil {
		d.failed("delivery", "cannot LISTEN on the listener's connection string: ", err, fix)
		return
	}
	defer c.unlisten()
	if st, _ := l.connection(); !st.up {
		d.add("delivery", StatusFail, "cannot LISTEN on the listener's connection string: "+errorText(st.err), fix)
		return
	}
	cause := "nothing arrived"
	for range 2 {
		start := time.Now()
		outcome, why := c.probe(ctx)
		switch outcome {
		case probeArrived:
			d.add("delivery", StatusOK, fmt.Sprintf("a NOTIFY through the pool reached the Listener's connection in %v",
				time.Since(start).Round(time.Microsecond)), "")
			return
		case probeLost:
			cause = why
		}
		if ctx.Err() != nil {
			break
		}
	}
	if err := ctx.Err(); err != nil {
		d.failed("delivery", "not checked: the time ran out while a probe was on its way: ", err, "allow more time")
		return
	}
	d.add("delivery", StatusFail, "a NOTIFY sent through the pool never reached a LISTEN on the listener's connection string: "+cause,
		"give the Listener a direct (or session-mode) connection to the pool's database on the primary")
}
