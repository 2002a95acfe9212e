package jobwatch

// The notify gate (WithNotifyGate): of the transactions inserting jobs at
// the same time only one notifies; the others hold a marker lock until they
// end, and the watches' trailing polls find their jobs.

// The gate's advisory lock keys: the first int4 of each, the second being
// hashtext(channel).
const (
	gateNotifyKey = "hashtext('jobwatch notify')"
	gateSkipKey   = "hashtext('jobwatch skip')"
)

// gateStatementSQL is the part of the statement trigger's body that makes
// a transaction skip its NOTIFY when another one holds the notify key.
// Every notifying transaction first takes the skip key in shared mode, so
// that a watch can tell whether a skipper is still open (skippersOpenSQL).
func gateStatementSQL(channelLiteral string) string {
	return `
    PERFORM pg_advisory_xact_lock_shared(` + gateSkipKey + `, hashtext(` + channelLiteral + `));
    IF NOT pg_try_advisory_xact_lock(` + gateNotifyKey + `, hashtext(` + channelLiteral + `)) THEN
        RETURN NULL;
    END IF;`
}

// skippersOpenSQL is true, for the channel $1, while a transaction that
// skipped its notification is open: such transactions hold the skip key in
// shared mode, so an exclusive try fails.
const skippersOpenSQL = `SELECT NOT CASE WHEN pg_try_advisory_lock(` + gateSkipKey + `, hashtext($1))
	THEN pg_advisory_unlock(` + gateSkipKey + `, hashtext($1)) ELSE false END`
