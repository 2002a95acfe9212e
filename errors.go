package jobwatch

import "errors"

// Errors of this package, returned wrapped: test for them with errors.Is.
//
// One rule for messages: an error an exported function returns starts with
// "jobwatch: " once, then names the step that failed and the table or
// channel it concerns ("jobwatch: watch jobs: nil pool"). The errors in
// Stats and ListenerStats, and those logged as the "error" attribute of a
// line whose message starts with "jobwatch: ", name the step only ("poll
// jobs: ...", "listener: connect: ...").
var (
	// ErrInvalidTableName is returned by every function taking a table
	// name, for one that is empty or that PostgreSQL could not read as
	// [schema.]table.
	ErrInvalidTableName = errors.New("invalid table name")
	// ErrInvalidOption is returned by NewListener, NewListenerConfig and
	// the watch, poll and trigger functions for an option that does not
	// apply to them (such as WithNotifyGate given to a Listener) or an
	// option value out of range.
	ErrInvalidOption = errors.New("invalid option")
)

// Errors for a nil or unusable argument.
var (
	// ErrNilPool is returned by the watch, poll and trigger functions for a
	// nil *pgxpool.Pool.
	ErrNilPool = errors.New("nil pool")
	// ErrNilListener is returned by the watch functions for a nil
	// *Listener, and by a nil Listener's Subscribe.
	ErrNilListener = errors.New("nil listener")
	// ErrNilChannel is returned by the watch and poll functions for a nil
	// wake channel.
	ErrNilChannel = errors.New("nil wake channel")
	// ErrUnbufferedChannel is returned by the watch and poll functions for
	// a wake channel without a buffer: the library never blocks on it, so
	// an unbuffered channel would drop nearly every wake-up.
	ErrUnbufferedChannel = errors.New("unbuffered wake channel")
	// ErrInvalidPollInterval is returned by the watch and poll functions for
	// a poll interval of zero or less.
	ErrInvalidPollInterval = errors.New("poll interval must be positive")
)

// Errors about the job table and its triggers.
var (
	// ErrTableNotFound is returned by EnsureNotificationTriggers and
	// NotificationTriggersHealthy when the job table does not exist
	// (to_regclass finds nothing under that name, schema included).
	ErrTableNotFound = errors.New("table does not exist")
	// ErrMissingColumns is returned by EnsureNotificationTriggers when the
	// table lacks a column the library relies on: status, run_at or
	// locked_by.
	ErrMissingColumns = errors.New("table lacks a job column")
	// ErrColumnType is returned by EnsureNotificationTriggers when a job
	// column has a type the triggers cannot use: run_at must be a
	// timestamp, with or without time zone.
	ErrColumnType = errors.New("job column of the wrong type")
	// ErrTriggersBusy is returned by EnsureNotificationTriggers when the
	// triggers could not be installed right now: a writer holds a lock on
	// the table (the installer never queues behind it), or another
	// installer held the installation lock for longer than a second.
	// Nothing was changed; try again later (a watch does).
	ErrTriggersBusy = errors.New("trigger installation busy")
	// ErrPermissionDenied is returned by EnsureNotificationTriggers when the
	// triggers need installing or updating and the role lacks the right to
	// (it must own the table, and be able to create functions in its
	// schema). Run CreateNotificationTriggerSQL as the table's owner, in a
	// migration for example.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrNameTaken is returned by EnsureNotificationTriggers when an object
	// under a name the triggers need (a function or the skip counter, in
	// the table's schema) belongs to a role that is neither the table's
	// owner nor a superuser, or is not what jobwatch would create there.
	// Its owner could change what every INSERT runs, so jobwatch does not
	// use it: drop it, then install again.
	ErrNameTaken = errors.New("name taken by another role's object")
	// ErrInvalidJobTable is returned by the watch, poll and trigger
	// functions and Diagnose for a JobTable (WithJobTable) that cannot be
	// watched: Pending that is not a condition PostgreSQL accepts as a
	// partial index predicate over the table's own columns, or that could
	// end the statement it is written into; a RunAt or Queue column that
	// is missing or of the wrong type; an unknown RunAtTimeZone. The
	// message names the reason. Nothing is installed.
	ErrInvalidJobTable = errors.New("invalid job table description")
)

// Errors of the Listener.
var (
	// ErrListenerClosed is returned by Subscribe, and by the watch
	// functions, once the Listener is closed.
	ErrListenerClosed = errors.New("listener closed")
)

// The SQLSTATE codes this package raises (in the install script) or
// reads, by their PostgreSQL names.
const (
	sqlstateUndefinedTable   = "42P01"
	sqlstateUndefinedColumn  = "42703"
	sqlstateDatatypeMismatch = "42804"
	sqlstateLockNotAvailable = "55P03"
	sqlstatePermissionDenied = "42501"
	sqlstateDuplicateObject  = "42710"
	sqlstateReadOnly         = "25006" // read_only_sql_transaction: a standby
	sqlstateInvalidName      = "42602"
	// invalid_object_definition: a JobTable the install script refuses.
	sqlstateInvalidDescription = "42P17"
)
