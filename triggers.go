package jobwatch

import (
	"strconv"
	"strings"
)

// transitionTable is the name the statement triggers give their NEW TABLE.
const transitionTable = "jobwatch_new_rows"

// CreateNotificationTriggerSQL returns one SQL statement (a DO block) that
// installs the notification triggers of a job table, or brings them up to
// date, and changes nothing when they are current. Run it in a migration
// when workers must not do DDL: it needs the rights of the table's owner.
// It:
//
//   - fails with a clear message when the table does not exist, lacks the
//     status, run_at or locked_by column, or has a run_at that is not a
//     timestamp (which would make every INSERT fail);
//   - reads the catalog first and, when everything is in place and its
//     function bodies are the ones this version installs, ends there: no
//     lock, no DDL, so it also succeeds for a role without DDL rights;
//   - otherwise takes a transaction-level advisory lock (the key IHP
//     uses), so only one installer works at a time and none meets "tuple
//     concurrently updated": another installer, a worker trying at the
//     same moment as a migration for example, is waited for up to one
//     second (an install takes milliseconds), after which it fails with
//     SQLSTATE 55P03; then it reads the catalog again, and ends there
//     when the other one has done the work;
//   - creates or replaces the trigger function jobwatch_notify_<table> when
//     its body differs, which locks only the function's catalog row, and
//     creates IHP's notify_job_queued_<table> for IHP's per-row triggers
//     when it is missing (never replacing IHP's own);
//   - creates each missing trigger after taking the table lock with NOWAIT
//     under a short lock_timeout, so it never queues behind a writer and
//     never makes later writers queue behind it. A trigger that exists is
//     never dropped, IHP's included.
//
// The triggers, AFTER INSERT and AFTER UPDATE, fire once per statement and
// read its new rows from a transition table. A statement that leaves rows
// in job_status_not_started or job_status_retry sends one NOTIFY on
// ChannelName(tableName) when some are due now (payload "" for one job,
// "due:<n>" for n, counted up to 1000), and one with payload
// "at:<epoch seconds>" when some are scheduled for later (when the earliest
// is due, on the server's clock). A transaction announces at most 4 counts
// or times on a channel (a later "at:" only when it is earlier than those
// announced); past that it sends "poll", which PostgreSQL merges into one
// and which makes each watch look at the table itself. Any payload wakes
// an IHP worker, which ignores it.
//
// On a partitioned table the statement triggers go on the table and on
// every partition, because a statement that names a partition fires only
// that partition's statement triggers. A row trigger on the partitioned
// table, which PostgreSQL clones onto every partition created or attached
// later, sends "poll" for the rows of a partition until the statement
// triggers are installed on it too; installing them disables that
// partition's clone, so bulk inserts keep one notification per statement.
//
// Every name is quoted; no table name can inject SQL. For a name that is not
// a valid table name the statement raises an error when run.
func CreateNotificationTriggerSQL(tableName string) string {
	return CreateNotificationTriggerSQLWith(tableName)
}

// CreateNotificationTriggerSQLWith is CreateNotificationTriggerSQL with
// options; WithNotifyGate is the one that changes the script. An option
// that does not apply gives a script that raises ErrInvalidOption's text.
func CreateNotificationTriggerSQLWith(tableName string, opts ...Option) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return raiseSQL(err)
	}
	o, err := buildOptions(scopeTriggers, opts)
	if err != nil {
		return raiseSQL(err)
	}
	return n.triggerSQL(o.gate)
}

// raiseSQL returns a statement that fails with err's message when run.
func raiseSQL(err error) string {
	return "DO " + dollarQuote("jobwatch",
		" BEGIN RAISE EXCEPTION '%', "+quoteLiteral("jobwatch: "+err.Error())+" USING ERRCODE = '42602'; END ")
}

// statementBody is the body of jobwatch_notify_<table>, which the
// statement triggers call.
func (n names) statementBody(gate bool) string {
	ch := quoteLiteral(n.channel)
	bound := strconv.Itoa(maxAnnouncements)
	// status::text: the column may be IHP's job_status enum, text or a
	// domain over text, and comparing as text cannot fail on an enum that
	// lacks one of the labels. One pass over the statement's rows.
	look := `
        SELECT count(*) FILTER (WHERE j.run_at <= now()), min(j.run_at) FILTER (WHERE j.run_at > now())
          INTO due, next_at FROM ` + transitionTable + ` j
         WHERE j.status::text IN (` + pendingStatuses + `);`
	prefix, decide := "''", `
    IF TRUE THEN`+look+`
    END IF;`
	if gate {
		prefix = quoteLiteral(payloadGated)
		decide = `
    -- An UPDATE rarely leaves a job pending (a fetch or a completion does
    -- not): it looks first, and only then takes part in the gate.
    IF TG_OP = 'UPDATE' THEN` + look + `
        IF due = 0 AND next_at IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;` + gateStatementSQL(ch, quoteLiteral(n.table.qualify(n.counter))) + `
    IF TG_OP = 'INSERT' THEN` + look + `
    END IF;`
	}
	return `
DECLARE
    due bigint := 0;
    next_at timestamptz;
    state text;
    sent int;
    announced numeric;
    announce text[] := '{}';
    payload text;
    skips bigint;
BEGIN` + decide + `
    -- What this transaction has announced on the channel so far: how many
    -- counts and times, and the earliest time. PostgreSQL merges identical
    -- notifications of a transaction, but not these, so past ` + bound + ` the
    -- transaction sends "poll" (merged into one), and each watch then
    -- reads the count and the time from the table itself.
    state := current_setting(` + quoteLiteral(n.setting) + `, true);
    sent := coalesce(nullif(split_part(state, ' ', 1), '')::int, 0);
    announced := nullif(split_part(state, ' ', 2), '')::numeric;
    IF due = 1 THEN
        announce := announce || ''::text; -- merged with the transaction's other ones: not counted
    ELSIF due > 1 THEN
        announce := announce || ('` + payloadDue + `' || least(due, ` + strconv.Itoa(maxDueCount) + `));
    END IF;
    -- The time is absolute, on the server's clock: the notification is
    -- delivered at commit, however long after this statement that is.
    IF next_at IS NOT NULL AND (announced IS NULL OR extract(epoch FROM next_at) < announced) THEN
        announced := extract(epoch FROM next_at);
        announce := announce || ('` + payloadAt + `' || announced);
    END IF;
    FOREACH payload IN ARRAY announce LOOP
        IF payload <> '' THEN
            IF sent >= ` + bound + ` THEN
                payload := '` + payloadPoll + `';
            END IF;
            sent := sent + 1;
        END IF;
        PERFORM pg_notify(` + ch + `, ` + prefix + ` || payload);
    END LOOP;
    PERFORM set_config(` + quoteLiteral(n.setting) + `, sent || ' ' || coalesce(announced::text, ''), true);
    RETURN NULL;
END
`
}

// rowBody is the body of the row trigger a partitioned table gets: it
// fires only on partitions that lack their own statement triggers.
func (n names) rowBody() string {
	return `
BEGIN
    -- One "poll" per row; PostgreSQL merges them into one per transaction.
    PERFORM pg_notify(` + quoteLiteral(n.channel) + `, '` + payloadPoll + `');
    RETURN NULL;
END
`
}

// ihpBody is IHP's body of notify_job_queued_<table>, to the byte, so that
// an IHP worker and jobwatch never see each other's version as different.
func (n names) ihpBody() string {
	return "BEGIN\n    PERFORM pg_notify(" + quoteLiteral(n.channel) + ", '');\n    RETURN new;\nEND;\n"
}

// hasTrigger is SQL that is true when relation rel has a trigger named
// name (enabled, when enabled is set).
func hasTrigger(rel, name string, enabled bool) string {
	s := "EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = " + rel + " AND tgname = " + quoteLiteral(name)
	if enabled {
		s += " AND tgenabled <> 'D'"
	}
	return s + ")"
}

// columnsSQL says what of the job columns table tbl (a regclass
// expression) lacks: the missing ones of status, run_at and locked_by, as a
// list (NULL when none), and the type of run_at, which the triggers compare
// with now(), so that any type but a timestamp would make every INSERT
// fail.
func columnsSQL(tbl string) string {
	return `SELECT (SELECT string_agg(col, ', ') FROM unnest(ARRAY['status', 'run_at', 'locked_by']) AS col
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = ` + tbl + ` AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped)),
       (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
         WHERE a.attrelid = ` + tbl + ` AND a.attname = 'run_at' AND a.attnum > 0 AND NOT a.attisdropped)`
}

// partitionsSQL lists the partitions of table tbl (a regclass expression)
// at every level, with what each has of jobwatch's triggers.
func (n names) partitionsSQL(tbl string) string {
	return `SELECT p.relid, pc.relkind = 'r' AS leaf,
       ` + hasTrigger("p.relid", n.partInsertTrigger, false) + ` AS has_insert,
       ` + hasTrigger("p.relid", n.partUpdateTrigger, false) + ` AS has_update,
       ` + hasTrigger("p.relid", n.rowTrigger, true) + ` AS row_on
  FROM pg_partition_tree(` + tbl + `) p JOIN pg_class pc ON pc.oid = p.relid
 WHERE p.relid <> ` + tbl + ` AND pc.relkind IN ('r', 'p')`
}

// stateSQL is the one query that says what of the installation is
// missing; EnsureNotificationTriggers, NotificationTriggersHealthy and the
// install script all read it. tbl is a regclass expression, stmtBody and
// rowBody text expressions of the bodies this version installs. It returns
// no row when the table does not exist. Columns: partitioned, has_insert,
// has_update, has_row, uncovered (partitions whose statements notify
// nobody), incomplete (partitions lacking their statement triggers or
// still firing the row trigger), stale (a function of jobwatch's has
// another body), has_counter (the gate's skip counter exists).
func (n names) stateSQL(tbl, stmtBody, rowBody string) string {
	sameBody := func(fn, body string) string {
		return "EXISTS (SELECT 1 FROM pg_proc WHERE oid = to_regprocedure(" + quoteLiteral(fn+"()") +
			") AND prosrc IS DISTINCT FROM " + body + ")"
	}
	return `WITH parts AS (` + n.partitionsSQL(tbl) + `)
SELECT c.relkind = 'p',
       ` + hasTrigger("c.oid", n.insertTrigger, false) + `,
       ` + hasTrigger("c.oid", n.updateTrigger, false) + `,
       ` + hasTrigger("c.oid", n.rowTrigger, false) + `,
       (SELECT count(*)::int FROM parts WHERE NOT (has_insert AND has_update) AND NOT (leaf AND row_on)),
       (SELECT count(*)::int FROM parts WHERE NOT (has_insert AND has_update) OR (leaf AND row_on)),
       ` + sameBody(n.table.qualify(n.function), stmtBody) + ` OR ` + sameBody(n.table.qualify(n.rowFunction), rowBody) + `,
       to_regclass(` + quoteLiteral(n.table.qualify(n.counter)) + `) IS NOT NULL
  FROM pg_class c WHERE c.oid = ` + tbl
}

// triggerSQL is the install script (see CreateNotificationTriggerSQL).
func (n names) triggerSQL(gate bool) string {
	table := n.table.quoted()
	fn := n.table.qualify(n.function)
	rowFn := n.table.qualify(n.rowFunction)
	ihpFn := n.table.qualify(n.ihpFunction)
	raw := quoteLiteral(n.table.raw)
	schemaKey := "current_schema()"
	if n.table.schema != "" {
		schemaKey = quoteLiteral(n.table.schema)
	}
	createFunction := func(name, body string) string {
		return `EXECUTE 'CREATE OR REPLACE FUNCTION ` + strings.ReplaceAll(name, "'", "''") +
			`() RETURNS trigger LANGUAGE plpgsql AS ' || quote_literal(` + body + `);`
	}
	statementTrigger := func(trigger, event, on string) string {
		return "CREATE TRIGGER " + ident(trigger) + " AFTER " + event + " ON " + on +
			" REFERENCING NEW TABLE AS " + transitionTable + " FOR EACH STATEMENT EXECUTE FUNCTION " + fn + "()"
	}
	// For the partitions, whose names are known only when it runs, the
	// script builds the same statements with format().
	partTrigger := func(trigger, event string) string {
		return `EXECUTE format(` + quoteLiteral("CREATE TRIGGER %I AFTER "+event+" ON %s REFERENCING NEW TABLE AS "+
			transitionTable+" FOR EACH STATEMENT EXECUTE FUNCTION "+fn+"()") + `, ` + quoteLiteral(trigger) + `, part.relid);`
	}
	ihp := ""
	if n.ownsIHPFunction {
		ihp = `
        IF to_regprocedure(` + quoteLiteral(ihpFn+"()") + `) IS NULL THEN
            ` + createFunction(ihpFn, "ihp_body") + `
        END IF;`
	}

	block := `
DECLARE
    tbl regclass := to_regclass(` + quoteLiteral(table) + `);
    stmt_body text := ` + dollarQuote("jobwatch_fn", n.statementBody(gate)) + `;
    row_body text := ` + dollarQuote("jobwatch_fn", n.rowBody()) + `;
    ihp_body text := ` + dollarQuote("jobwatch_fn", n.ihpBody()) + `;
    missing text;
    run_at_type text;
    st_partitioned bool;
    st_has_insert bool;
    st_has_update bool;
    st_has_row bool;
    st_uncovered int;
    st_incomplete int;
    st_stale bool;
    st_has_counter bool;
    part record;
    caller_lock_timeout text := current_setting('lock_timeout');
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'jobwatch: table % does not exist', ` + raw + ` USING ERRCODE = '42P01';
    END IF;
    SELECT * INTO missing, run_at_type FROM (` + columnsSQL("tbl") + `) s;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'jobwatch: table % lacks column(s) %', ` + raw + `, missing USING ERRCODE = '42703';
    END IF;
    IF run_at_type NOT IN ('timestamp with time zone', 'timestamp without time zone') THEN
        RAISE EXCEPTION 'jobwatch: column run_at of table % must be a timestamp, not %', ` + raw + `, run_at_type USING ERRCODE = '42804';
    END IF;
    SELECT * INTO st_partitioned, st_has_insert, st_has_update, st_has_row, st_uncovered, st_incomplete, st_stale, st_has_counter
      FROM (` + n.stateSQL("tbl", "stmt_body", "row_body") + `) s;
    -- Current: nothing to do, so no lock and no DDL.
    IF st_has_insert AND st_has_update AND NOT st_stale AND st_has_counter AND (NOT st_partitioned OR (st_has_row AND st_incomplete = 0)) THEN
        RETURN;
    END IF;
    SET LOCAL lock_timeout = '1s';
    -- One installer at a time (IHP's key). The others wait, at most
    -- lock_timeout: an install takes milliseconds, and a migration must not
    -- fail because a worker tries at the same moment. The wait holds no
    -- table lock, so writers go on meanwhile.
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext(` + schemaKey + `), hashtext(` + quoteLiteral(n.ihpFunction) + `::name::text));
    EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION 'jobwatch: notification trigger installation already in progress for %', ` + raw + ` USING ERRCODE = '55P03';
    END;
    -- Read again under the lock: another installer may just have finished.
    SELECT * INTO st_partitioned, st_has_insert, st_has_update, st_has_row, st_uncovered, st_incomplete, st_stale, st_has_counter
      FROM (` + n.stateSQL("tbl", "stmt_body", "row_body") + `) s;
    IF NOT st_has_counter THEN
        -- The notify gate's skip counter (see WithNotifyGate): every
        -- producer may bump it, every watch read it.
        CREATE SEQUENCE IF NOT EXISTS ` + n.table.qualify(n.counter) + ` OWNED BY ` + table + `.run_at;
        GRANT USAGE, SELECT, UPDATE ON SEQUENCE ` + n.table.qualify(n.counter) + ` TO PUBLIC;
    END IF;
    IF st_stale OR to_regprocedure(` + quoteLiteral(fn+"()") + `) IS NULL THEN
        ` + createFunction(fn, "stmt_body") + `
    END IF;
    IF st_partitioned AND (st_stale OR to_regprocedure(` + quoteLiteral(rowFn+"()") + `) IS NULL) THEN
        ` + createFunction(rowFn, "row_body") + `
    END IF;
    IF NOT st_has_insert OR NOT st_has_update OR (st_partitioned AND NOT st_has_row) THEN` + ihp + `
        -- The row trigger is cloned onto every partition: lock them all.
        IF st_partitioned AND NOT st_has_row THEN
            LOCK TABLE ` + table + ` IN SHARE ROW EXCLUSIVE MODE NOWAIT;
        ELSE
            LOCK TABLE ONLY ` + table + ` IN SHARE ROW EXCLUSIVE MODE NOWAIT;
        END IF;
    END IF;
    IF NOT st_has_insert THEN
        ` + statementTrigger(n.insertTrigger, "INSERT", table) + `;
    END IF;
    IF NOT st_has_update THEN
        ` + statementTrigger(n.updateTrigger, "UPDATE", table) + `;
    END IF;
    IF st_partitioned AND NOT st_has_row THEN
        CREATE TRIGGER ` + ident(n.rowTrigger) + ` AFTER INSERT OR UPDATE ON ` + table + `
            FOR EACH ROW WHEN (NEW.status::text IN (` + pendingStatuses + `)) EXECUTE FUNCTION ` + rowFn + `();
    END IF;
    IF st_partitioned THEN
        -- Statement triggers on each partition, then its clone of the row
        -- trigger off. Only a leaf's clone: one on a partitioned partition
        -- is what PostgreSQL copies onto the partitions created under it.
        FOR part IN ` + n.partitionsSQL("tbl") + ` LOOP
            CONTINUE WHEN part.has_insert AND part.has_update AND NOT (part.leaf AND part.row_on);
            EXECUTE format('LOCK TABLE ONLY %s IN SHARE ROW EXCLUSIVE MODE NOWAIT', part.relid);
            IF NOT part.has_insert THEN
                ` + partTrigger(n.partInsertTrigger, "INSERT") + `
            END IF;
            IF NOT part.has_update THEN
                ` + partTrigger(n.partUpdateTrigger, "UPDATE") + `
            END IF;
            IF part.leaf AND part.row_on THEN
                EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', part.relid, ` + quoteLiteral(n.rowTrigger) + `);
            END IF;
        END LOOP;
    END IF;
    -- A migration tool may run this inside its own transaction: leave its
    -- lock_timeout as it was.
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
END
`
	return "DO " + dollarQuote("jobwatch", block)
}

// DropNotificationTriggerSQL returns SQL that removes what
// CreateNotificationTriggerSQL installs, for a down migration: jobwatch's
// trigger functions and, with them, every trigger that calls them, on the
// table and on its partitions. IHP's triggers and function, which call
// nothing of jobwatch's, stay. For a name that is not a valid table name
// the statement raises an error when run.
func DropNotificationTriggerSQL(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return raiseSQL(err)
	}
	return "DROP FUNCTION IF EXISTS " + n.table.qualify(n.function) + "() CASCADE;\n" +
		"DROP FUNCTION IF EXISTS " + n.table.qualify(n.rowFunction) + "() CASCADE;\n" +
		"DROP SEQUENCE IF EXISTS " + n.table.qualify(n.counter) + ";\n"
}
