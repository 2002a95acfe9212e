package jobwatch

import "fmt"

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
		return CreateNotificationTriggerSQL(tableName) // raises the same error
	}
	table := n.table.quoted()
	typ := n.table.qualify("job_status")
	index := pgIdent(derivedName("jobwatch_pending_", n.table.base()))
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
CREATE INDEX IF NOT EXISTS %[3]s ON %[1]s (run_at)
    WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL;
`, table, typ, index)
}
