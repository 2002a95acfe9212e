package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Errors returned (wrapped) by the trigger functions; callers branch on them
// with errors.Is.
var (
	// ErrNilPool is returned when a nil *pgxpool.Pool is passed.
	ErrNilPool = errors.New("nil pool")
	// ErrTableNotFound means the job table does not exist (to_regclass
	// found nothing under that name).
	ErrTableNotFound = errors.New("table does not exist")
	// ErrMissingColumns means the table lacks a column the library relies
	// on: status, run_at or locked_by.
	ErrMissingColumns = errors.New("table lacks a job column")
	// ErrColumnType means a job column has a type the triggers cannot use:
	// run_at must be a timestamp (with or without time zone).
	ErrColumnType = errors.New("job column of the wrong type")
	// ErrTriggersBusy means the triggers could not be installed right now
	// without waiting: another installer holds the installation lock, or a
	// writer holds a lock on the table. Nothing was changed; try again later
	// (the poller's repair does).
	ErrTriggersBusy = errors.New("trigger installation busy")
)

// Notification payloads sent by the trigger function. An empty payload (as
// IHP's triggers send) means one job is due; payloadDue+"<n>" means n jobs
// became due in one statement; payloadIn+"<seconds>" means the earliest job
// of a statement is due that many seconds from now.
const (
	payloadDue   = "due:"
	payloadIn    = "in:"
	payloadGated = "g:" // prefix: sent by a gated trigger (see WithNotifyGate)
)

// The advisory lock keys of the notify gate: the first int4 of each, the
// second being hashtext(channel).
const (
	gateNotifyKey = "hashtext('jobwatch notify')"
	gateSkipKey   = "hashtext('jobwatch skip')"
)

// maxDueCount caps the count of due rows a statement's notification
// carries.
const maxDueCount = 1000

// transitionTable is the name the statement triggers give their NEW TABLE.
const transitionTable = "jobwatch_new_rows"

// execer is what trigger installation needs: a *pgxpool.Pool or a *pgx.Conn.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// CreateNotificationTriggerSQL returns one SQL statement (a DO block) that
// installs the notification triggers of a job table. It:
//
//   - fails with a clear message when the table does not exist, lacks the
//     status, run_at or locked_by column, or has a run_at that is not a
//     timestamp (which would make every INSERT fail);
//   - takes a transaction-level advisory lock without waiting (the same key
//     IHP uses), so only one installer works at a time and the others fail at
//     once with SQLSTATE 55P03 instead of queueing or meeting "tuple
//     concurrently updated";
//   - always refreshes the trigger functions with CREATE OR REPLACE
//     FUNCTION, which locks only the functions' catalog rows: IHP's
//     notify_job_queued_<table>, which serves IHP's per-row triggers when
//     those are installed, and jobwatch_notify_<table>, which jobwatch's
//     statement triggers call (an IHP worker replaces IHP's function with
//     its per-row body whenever it starts, and that body, run per statement,
//     would notify on every UPDATE);
//   - creates each of the two triggers (AFTER INSERT and AFTER UPDATE) only
//     when it is missing, after taking the table lock with NOWAIT under a
//     short lock_timeout, so it never queues behind a writer and never makes
//     later writers queue behind it. A healthy trigger is never dropped.
//
// The triggers fire once per statement and read the statement's new rows
// from a transition table: a statement that leaves rows in
// job_status_not_started or job_status_retry sends one NOTIFY on
// ChannelName(tableName) when some are due now (payload "" for one job,
// "due:<n>" for n, counted up to 1000), and one with payload "in:<seconds>" when some are
// scheduled for later (the time until the earliest). Any payload wakes an
// IHP worker, which ignores it. The function body also works when called by
// IHP's per-row triggers, so IHP and Go workers can share a table.
//
// Every name is quoted; no table name can inject SQL. For a name that is not
// a valid table name the statement raises an error when run.
func CreateNotificationTriggerSQL(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return "DO " + dollarQuote("jobwatch",
			" BEGIN RAISE EXCEPTION 'jobwatch: %', "+quoteLiteral(err.Error())+" USING ERRCODE = '42602'; END ")
	}
	return n.triggerSQL(false)
}

// CreateNotificationTriggerSQLWith is CreateNotificationTriggerSQL with
// options; WithNotifyGate is the one that changes the script.
func CreateNotificationTriggerSQLWith(tableName string, opts ...Option) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return CreateNotificationTriggerSQL(tableName)
	}
	return n.triggerSQL(buildOptions(opts).gate)
}

// quoteLiteral returns s as an SQL string literal that reads the same
// whatever standard_conforming_strings says.
func quoteLiteral(s string) string {
	s = strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(s, `\`, `\\`) + "'"
	}
	return "'" + s + "'"
}

// dollarQuote wraps body in a dollar quote whose tag does not occur in body.
func dollarQuote(tag, body string) string {
	t := "$" + tag + "$"
	for i := 0; strings.Contains(body, t); i++ {
		t = "$" + tag + strconv.Itoa(i) + "$"
	}
	return t + body + t
}

func (n names) triggerSQL(gate bool) string {
	chanLit := quoteLiteral(n.channel)
	fn := n.table.qualify(n.function)
	stmtFn := n.table.qualify(n.stmtFunction)
	table := n.table.quoted()
	schemaKey := "current_schema()"
	if n.table.schema != "" {
		schemaKey = quoteLiteral(n.table.schema)
	}

	// The gate: every notifying transaction first takes the skip key in
	// shared mode; then only the one holding the notify key notifies, the
	// others skip, and the watcher's trailing polls find their jobs.
	gateSQL, prefix := "", "''"
	if gate {
		gateSQL = `
    PERFORM pg_advisory_xact_lock_shared(` + gateSkipKey + `, hashtext(` + chanLit + `));
    IF NOT pg_try_advisory_xact_lock(` + gateNotifyKey + `, hashtext(` + chanLit + `)) THEN
        RETURN NULL;
    END IF;`
		prefix = "'" + payloadGated + "'"
	}
	body := `
DECLARE
    due bigint;
    next_at timestamptz;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        PERFORM pg_notify(` + chanLit + `, '');
        RETURN NULL;
    END IF;
    -- How many rows are due (counted up to ` + strconv.Itoa(maxDueCount) + `: no watcher wakes more
    -- workers than that), and when the earliest future one is due.
    SELECT count(*) INTO due FROM (SELECT 1 FROM ` + transitionTable + ` j
     WHERE j.run_at <= now() AND j.status::text IN ('job_status_not_started', 'job_status_retry')
     LIMIT ` + strconv.Itoa(maxDueCount) + `) d;
    SELECT min(j.run_at) INTO next_at FROM ` + transitionTable + ` j
     WHERE j.run_at > now() AND j.status::text IN ('job_status_not_started', 'job_status_retry');
    IF due = 0 AND next_at IS NULL THEN
        RETURN NULL;
    END IF;` + gateSQL + `
    IF due = 1 THEN
        PERFORM pg_notify(` + chanLit + `, ` + prefix + `);
    ELSIF due > 1 THEN
        PERFORM pg_notify(` + chanLit + `, ` + prefix + ` || '` + payloadDue + `' || due);
    END IF;
    IF next_at IS NOT NULL THEN
        PERFORM pg_notify(` + chanLit + `, ` + prefix + ` || '` + payloadIn + `' || extract(epoch FROM next_at - clock_timestamp()));
    END IF;
    RETURN NULL;
END
`
	quotedBody := dollarQuote("jobwatch_fn", body)
	exists := func(trigger string) string {
		return "EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = " + quoteLiteral(trigger) + ")"
	}
	create := func(trigger, event string) string {
		return "CREATE TRIGGER " + pgIdent(trigger) + " AFTER " + event + " ON " + table +
			" REFERENCING NEW TABLE AS " + transitionTable +
			" FOR EACH STATEMENT EXECUTE FUNCTION " + stmtFn + "()"
	}
	raw := quoteLiteral(n.table.raw)

	block := `
DECLARE
    tbl regclass := to_regclass(` + quoteLiteral(table) + `);
    missing text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'jobwatch: table % does not exist', ` + raw + ` USING ERRCODE = '42P01';
    END IF;
    SELECT string_agg(c, ', ') INTO missing
      FROM unnest(ARRAY['status', 'run_at', 'locked_by']) AS c
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'jobwatch: table % lacks column(s) %', ` + raw + `, missing USING ERRCODE = '42703';
    END IF;
    -- The trigger compares run_at with now(): any other type would make
    -- every INSERT fail.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = 'run_at' AND NOT a.attisdropped
                      AND a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype)) THEN
        RAISE EXCEPTION 'jobwatch: column run_at of table % must be a timestamp', ` + raw + ` USING ERRCODE = '42804';
    END IF;
    SET LOCAL lock_timeout = '1s';
    IF NOT pg_try_advisory_xact_lock(hashtext(` + schemaKey + `), hashtext(` + quoteLiteral(n.function) + `::name::text)) THEN
        RAISE EXCEPTION 'jobwatch: notification trigger installation already in progress for %', ` + raw + ` USING ERRCODE = '55P03';
    END IF;
    CREATE OR REPLACE FUNCTION ` + fn + `() RETURNS trigger LANGUAGE plpgsql AS ` + quotedBody + `;
    CREATE OR REPLACE FUNCTION ` + stmtFn + `() RETURNS trigger LANGUAGE plpgsql AS ` + quotedBody + `;
    IF NOT ` + exists(n.insertTrigger) + ` OR NOT ` + exists(n.updateTrigger) + ` THEN
        LOCK TABLE ` + table + ` IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    END IF;
    IF NOT ` + exists(n.insertTrigger) + ` THEN
        ` + create(n.insertTrigger, "INSERT") + `;
    END IF;
    IF NOT ` + exists(n.updateTrigger) + ` THEN
        ` + create(n.updateTrigger, "UPDATE") + `;
    END IF;
END
`
	return "DO " + dollarQuote("jobwatch", block)
}

func pgIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// installTriggers runs the trigger script and maps its errors to this
// package's sentinels.
func installTriggers(ctx context.Context, db execer, n names, gate bool) error {
	_, err := db.Exec(ctx, n.triggerSQL(gate))
	if err == nil {
		return nil
	}
	what := fmt.Sprintf("jobwatch: install notification triggers on %s", n.table.raw)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "42P01":
			return fmt.Errorf("%s: %w: %w", what, ErrTableNotFound, err)
		case "42703":
			return fmt.Errorf("%s: %w: %w", what, ErrMissingColumns, err)
		case "42804":
			return fmt.Errorf("%s: %w: %w", what, ErrColumnType, err)
		case "55P03":
			return fmt.Errorf("%s: %w: %w", what, ErrTriggersBusy, err)
		}
	}
	return fmt.Errorf("%s: %w", what, err)
}

// triggersHealthy reports whether both notification triggers exist on the
// table.
func triggersHealthy(ctx context.Context, pool *pgxpool.Pool, n names) (bool, error) {
	var found bool
	var count int
	err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL,
		(SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname IN ($2, $3) AND NOT tgisinternal)`,
		n.table.quoted(), n.insertTrigger, n.updateTrigger).Scan(&found, &count)
	if err != nil {
		return false, fmt.Errorf("jobwatch: check notification triggers on %s: %w", n.table.raw, err)
	}
	if !found {
		return false, fmt.Errorf("jobwatch: check notification triggers on %s: %w", n.table.raw, ErrTableNotFound)
	}
	return count == 2, nil
}

// NotificationTriggersHealthy reports whether both notification triggers
// (insert and update, under the names this package and IHP derive from
// tableName) exist on the table. It returns an error wrapping
// ErrTableNotFound when the table does not exist.
func NotificationTriggersHealthy(ctx context.Context, pool *pgxpool.Pool, tableName string) (bool, error) {
	n, err := deriveNames(tableName)
	if err != nil {
		return false, fmt.Errorf("jobwatch: %w", err)
	}
	if pool == nil {
		return false, fmt.Errorf("jobwatch: check notification triggers on %s: %w", tableName, ErrNilPool)
	}
	return triggersHealthy(ctx, pool, n)
}

// EnsureNotificationTriggers installs the notification triggers when either
// is missing and logs that it did; when both exist it changes nothing. It
// returns an error wrapping ErrTableNotFound, ErrMissingColumns,
// ErrColumnType or ErrTriggersBusy when those are the cause.
func EnsureNotificationTriggers(ctx context.Context, pool *pgxpool.Pool, tableName string, opts ...Option) error {
	n, err := deriveNames(tableName)
	if err != nil {
		return fmt.Errorf("jobwatch: %w", err)
	}
	if pool == nil {
		return fmt.Errorf("jobwatch: ensure notification triggers on %s: %w", tableName, ErrNilPool)
	}
	o := buildOptions(opts)
	_, err = ensureTriggers(ctx, pool, n, o)
	return err
}

// ensureTriggers is EnsureNotificationTriggers after validation; it reports
// whether it installed anything.
func ensureTriggers(ctx context.Context, pool *pgxpool.Pool, n names, o options) (bool, error) {
	logger := o.logger
	healthy, err := triggersHealthy(ctx, pool, n)
	if err != nil || healthy {
		return false, err
	}
	logger.Info("jobwatch: notification triggers missing, recreating",
		"table", n.table.raw, "insert_trigger", n.insertTrigger, "update_trigger", n.updateTrigger)
	if err := installTriggers(ctx, pool, n, o.gate); err != nil {
		return false, err
	}
	logger.Info("jobwatch: recreated notification triggers", "table", n.table.raw)
	return true, nil
}
