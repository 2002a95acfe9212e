package jobwatch

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The job table's SQL facts, stated once for the triggers, the poller and
// CreateJobTableSQL.
const (
	// pendingStatuses lists the statuses of a job that waits to run.
	pendingStatuses = `'job_status_not_started', 'job_status_retry'`
	// pendingStatusArray is the same list as a text[], for the trigger
	// bodies' schema-qualified = ANY (see triggers.sql).
	pendingStatusArray = `'{job_status_not_started,job_status_retry}'::pg_catalog.text[]`
	// pendingNow is the spec's condition for a job that can run now. It
	// compares status with the list as the column's own type, so that the
	// partial index CreateJobTableSQL makes serves it.
	pendingNow = `status IN (` + pendingStatuses + `) AND locked_by IS NULL AND run_at <= now()`
	// pendingLater is the condition for a job scheduled for later: a job
	// at 'infinity' is never due, so not scheduled either.
	pendingLater = `status IN (` + pendingStatuses + `) AND locked_by IS NULL AND run_at > now() AND run_at < 'infinity'`
	// runAtTypes are the types run_at may have: the triggers compare it
	// with now(), which any other type would make fail on every INSERT.
	runAtTypes = `'timestamp with time zone', 'timestamp without time zone'`
	// pendingIndexPredicate is the partial index's predicate: pendingNow
	// without the time, which an index predicate cannot hold.
	pendingIndexPredicate = `status IN (` + pendingStatuses + `) AND locked_by IS NULL`
)

// CreateJobTableSQL returns SQL that creates an IHP-shaped job table, when
// it is missing, with the job_status enum type (also when missing) and the
// partial index on pending jobs that keeps each poll under a millisecond on
// a table of millions of finished jobs. tableName is read as by the other
// functions ([schema.]table, quoted parts keep their case). For an invalid
// name it returns a statement that raises an error when run.
//
// The schema is IHP's; add any columns your jobs need.
func CreateJobTableSQL(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return raiseSQL(err)
	}
	table := n.table.quoted()
	typ := ident("job_status")
	if n.table.schema != "" {
		typ = pgx.Identifier{n.table.schema, "job_status"}.Sanitize()
	}
	return fmt.Sprintf(`DO $$ BEGIN
    CREATE TYPE %[2]s AS ENUM ('job_status_not_started', 'job_status_running',
        'job_status_failed', 'job_status_timed_out', 'job_status_succeeded', 'job_status_retry');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE TABLE IF NOT EXISTS %[1]s (
    id UUID DEFAULT gen_random_uuid() PRIMARY KEY NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW() NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW() NOT NULL,
    status %[2]s DEFAULT 'job_status_not_started' NOT NULL,
    last_error TEXT DEFAULT NULL,
    attempts_count INT DEFAULT 0 NOT NULL,
    locked_at TIMESTAMP WITH TIME ZONE DEFAULT NULL,
    locked_by UUID DEFAULT NULL,
    run_at TIMESTAMP WITH TIME ZONE DEFAULT NOW() NOT NULL
);
%[3]s;
`, table, typ, pendingIndexSQL(n))
}

// pendingIndexSQL is the statement that creates the recommended partial
// index on pending jobs.
func pendingIndexSQL(n names) string {
	return "CREATE INDEX IF NOT EXISTS " + ident(ownName(indexPrefix, n.table.base())) + " ON " + n.table.quoted() +
		" (run_at)\n    WHERE " + pendingIndexPredicate
}

// isRunAtType reports whether typ, as format_type names it, is one of
// runAtTypes.
func isRunAtType(typ string) bool {
	return strings.Contains(runAtTypes, "'"+typ+"'")
}
