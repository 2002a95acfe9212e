package jobwatch

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// JobTable describes which rows of a job table wait to run and when each is
// due, so that any job table can be watched without changing its schema
// (see WithJobTable). A job is runnable when Pending holds and its due time
// has passed: RunAt's value, or now when RunAt is "" or the value is NULL.
//
// Pending is parsed by PostgreSQL against the table and accepted only as a
// partial index predicate would be: the row's own columns, immutable
// functions and operators, no subquery, no aggregate, nothing that changes
// with time (time belongs to RunAt). It is written as in a CREATE INDEX
// ... WHERE clause, with names resolved as with search_path = pg_catalog:
// qualify your own types and functions ('x'::app.job_state). The triggers
// and polls run PostgreSQL's own reading of it, every name qualified, on a
// pinned search_path, so that no producer's or pool's search_path changes
// what it means. A description that cannot be watched is refused with
// ErrInvalidJobTable, before anything is installed.
type JobTable struct {
	// Pending is a condition over the row's own columns that holds while
	// its job waits, whatever its due time; "" = every row waits (a queue
	// that deletes finished jobs).
	Pending string
	// RunAt is the due-time column: timestamp with time zone, or timestamp
	// without time zone read in RunAtTimeZone. A NULL value means due now;
	// "" means no column: every pending row is due at once.
	RunAt string
	// RunAtTimeZone is the zone a timestamp-without-time-zone RunAt is
	// written in (e.g. "UTC", as Oban, GoodJob and Solid Queue write it);
	// "" = the session's TimeZone. It applies only to such a column.
	RunAtTimeZone string
	// Queue is the column whose value routes wake-ups (see WithQueues); ""
	// = none. It must be of a string type (text, varchar, char, name).
	Queue string
}

// IHPJobTable is IHP's job table: a job waits while its status is
// job_status_not_started or job_status_retry and locked_by is NULL, and is
// due at run_at. Every function uses it without WithJobTable, with the
// triggers IHP's workers share (their status may be IHP's enum, text or a
// domain over text).
var IHPJobTable = JobTable{Pending: pendingIndexPredicate, RunAt: "run_at"}

// String describes t in one line, as the log lines and the doctor name it.
func (t JobTable) String() string {
	if t == IHPJobTable {
		return "IHPJobTable"
	}
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+": "+quoteLiteral(v))
		}
	}
	add("Pending", t.Pending)
	add("RunAt", t.RunAt)
	add("RunAtTimeZone", t.RunAtTimeZone)
	add("Queue", t.Queue)
	if len(parts) == 0 {
		return "JobTable{every row, due at once}"
	}
	return "JobTable{" + strings.Join(parts, ", ") + "}"
}

// WithJobTable sets the description of the job table's rows (see
// JobTable); the default is IHPJobTable. It applies to the watch and poll
// functions, EnsureNotificationTriggers, CreateNotificationTriggerSQLWith
// and Diagnose. Every process watching a table must use the same
// description: the triggers are made for one, and a watch that finds them
// made for another, once it has started, polls instead of replacing them
// (see docs/job-tables.md). A description that cannot be watched
// makes the call fail with ErrInvalidJobTable.
func WithJobTable(t JobTable) Option {
	return func(o *options) {
		o.mark(optJobTable, false, "")
		o.job = t
	}
}

// WithQueues makes a watch or poller wake only for jobs whose Queue column
// (see JobTable) holds one of queues: its notifications are filtered by
// the queues they name, and its polls count and schedule only those jobs.
// It applies to the watch and poll functions, with a JobTable that has a
// Queue column; without queues, or without that column, the call fails
// with ErrInvalidOption. One Listener still serves every watch of a
// process. Without WithQueues a watch wakes for every queue. Jobs whose
// queue is NULL are announced without one and wake every watch of the
// table, whose polls do not count them.
func WithQueues(queues ...string) Option {
	return func(o *options) {
		bad := len(queues) == 0
		for _, q := range queues {
			bad = bad || strings.IndexByte(q, 0) >= 0 || !utf8.ValidString(q)
		}
		o.mark(optQueues, bad, "WithQueues(%q): give one or more queue names, valid UTF-8 without NUL", queues)
		o.queues = append([]string(nil), queues...)
	}
}

// Validate reports, without a server, whether t could describe any table:
// it returns an error wrapping ErrInvalidJobTable for column names
// PostgreSQL cannot hold, RunAtTimeZone without RunAt, and Pending text
// that could end the statement it is written into (a semicolon, a
// comment, a dollar sign, a backslash, an unterminated quote or unbalanced
// parentheses). The server checks the rest against the table when a watch
// starts or the triggers are installed.
func (t JobTable) Validate() error {
	if t == IHPJobTable {
		return nil
	}
	return checkJobTable(t)
}

// maxQueueTag is the longest queue name, in bytes, a notification names:
// a job of a queue with a longer name is announced as "poll", which every
// watch of the table follows.
const maxQueueTag = 200

// checkJobTable refuses, without a server, what no table could make
// watchable: column names PostgreSQL cannot hold, and Pending text that
// could end the statement or the script it is written into (a semicolon,
// a comment, a dollar quote, a backslash, an unterminated quote or
// unbalanced parentheses). The server parses the rest (describeSQL).
func checkJobTable(t JobTable) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidJobTable, t, fmt.Sprintf(format, args...))
	}
	for _, c := range []struct{ field, name string }{{"RunAt", t.RunAt}, {"Queue", t.Queue}} {
		switch {
		case c.name == "":
		case len(c.name) > maxIdentifierLen:
			return bad("%s: a column name is at most %d bytes", c.field, maxIdentifierLen)
		case strings.IndexByte(c.name, 0) >= 0 || !utf8.ValidString(c.name):
			return bad("%s: not a column name", c.field)
		}
	}
	if t.RunAtTimeZone != "" {
		if t.RunAt == "" {
			return bad("RunAtTimeZone without a RunAt column")
		}
		if len(t.RunAtTimeZone) > 100 || strings.IndexByte(t.RunAtTimeZone, 0) >= 0 || !utf8.ValidString(t.RunAtTimeZone) {
			return bad("RunAtTimeZone: not a time zone")
		}
	}
	if err := checkPendingText(t.Pending); err != nil {
		return bad("Pending: %v", err)
	}
	return nil
}

// checkPendingText accepts text that, put between parentheses, stays one
// expression: outside its quoted literals and identifiers it has no
// semicolon, comment, dollar sign or backslash, and its parentheses
// balance.
func checkPendingText(s string) error {
	if !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0 {
		return errors.New("not valid UTF-8 text")
	}
	if strings.IndexByte(s, '\\') >= 0 {
		return errors.New("a backslash is not accepted (write escapes as plain characters)")
	}
	depth := 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\'', '"':
			end := i + 1
			for {
				j := strings.IndexByte(s[end:], c)
				if j < 0 {
					return fmt.Errorf("unterminated %c quote", c)
				}
				end += j + 1
				if end < len(s) && s[end] == c { // a doubled quote
					end++
					continue
				}
				break
			}
			i = end - 1
		case '(':
			depth++
		case ')':
			if depth--; depth < 0 {
				return errors.New("unbalanced parentheses")
			}
		case ';':
			return errors.New("a semicolon is not accepted: one condition, no statement")
		case '$':
			return errors.New("a dollar sign is not accepted (no parameters, no dollar quotes)")
		case '-', '/':
			if i+1 < len(s) && ((c == '-' && s[i+1] == '-') || (c == '/' && s[i+1] == '*')) {
				return errors.New("comments are not accepted")
			}
		}
	}
	if depth != 0 {
		return errors.New("unbalanced parentheses")
	}
	return nil
}

// described is a JobTable as the server read it: Pending printed back by
// PostgreSQL with every name outside pg_catalog qualified ("true" for
// every row), the record of the whole description that the trigger
// function carries (a JSON object on one line), and the table's name as
// the pinned search_path needs it.
type described struct {
	pred, record string
	table        string // the table's name, schema-qualified, quoted where need be
}

// describe has the server read t against the table n (see describeSQL),
// in a transaction it rolls back. It returns an error wrapping
// ErrInvalidJobTable for a description the table cannot be watched with,
// ErrTableNotFound when there is no table.
func describe(ctx context.Context, q txBeginner, n names) (described, error) {
	var d described
	tx, err := q.Begin(ctx)
	if err != nil {
		return d, fmt.Errorf("describe %s: %w", n.table.raw, err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, n.describeSQL()); err != nil {
		return d, fmt.Errorf("describe %s: %w", n.table.raw, mapScriptError(err))
	}
	err = tx.QueryRow(ctx, "SELECT pg_catalog.current_setting($1 || '_pred'), pg_catalog.current_setting($1 || '_record'), pg_catalog.current_setting($1 || '_table')",
		describedSetting).Scan(&d.pred, &d.record, &d.table)
	if err == nil && (d.pred == "" || d.record == "" || d.table == "") {
		err = errors.New("the server's reading is empty")
	}
	if err != nil {
		return described{}, fmt.Errorf("describe %s: %w", n.table.raw, err)
	}
	return d, nil
}

// describedSetting starts the names of the settings where describeSQL
// leaves its reading (_pred, _record, _table), for the rest of its
// transaction.
const describedSetting = "jobwatch.described"

// txBeginner is what describe needs: a *pgxpool.Pool or a *pgx.Conn.
type txBeginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// shape is a table's JobTable as the server read it: read once, by the
// first of a watch's poller and installer that needs it, and kept.
type shape struct {
	mu sync.Mutex
	d  *described
}

// get returns the server's reading of n's JobTable (the zero value for
// IHP's table, which needs none), reading it first if need be.
func (s *shape) get(ctx context.Context, q txBeginner, n names) (described, error) {
	if !n.custom() {
		return described{}, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.d == nil {
		d, err := describe(ctx, q, n)
		if err != nil {
			return d, err
		}
		s.d = &d
	}
	return *s.d, nil
}

// descriptionOf names n's description, as the server read it, for a log
// line: the record the trigger function carries.
func descriptionOf(n names, d described) string {
	if !n.custom() {
		return IHPJobTable.String()
	}
	return d.record
}

// exprs are the SQL expressions over a job row j that a JobTable other
// than IHP's means, for the trigger body and the polls, which run them on
// a pinned search_path.
type exprs struct {
	queue    string // the row's queue as text; NULL without a Queue column
	dueNow   string // the job is due now
	dueAt    string // when it is due, a timestamptz
	dueLater string // it is due later, at a finite time
}

func jobExprs(t JobTable) exprs {
	e := exprs{queue: "NULL::pg_catalog.text", dueNow: "true", dueAt: "NULL::pg_catalog.timestamptz", dueLater: "false"}
	if t.Queue != "" {
		e.queue = "j." + ident(t.Queue) + "::pg_catalog.text"
	}
	if t.RunAt != "" {
		due := "j." + ident(t.RunAt) + "::pg_catalog.timestamptz"
		if t.RunAtTimeZone != "" {
			due = "pg_catalog.timezone(" + quoteLiteral(t.RunAtTimeZone) + "::pg_catalog.text, j." + ident(t.RunAt) + ")"
		}
		e.dueAt = due
		e.dueNow = due + " IS NULL OR " + due + " <= pg_catalog.now()"
		e.dueLater = due + " > pg_catalog.now() AND pg_catalog.isfinite(" + due + ")"
	}
	return e
}

// customPollSQL is the poll's query for a JobTable other than IHP's: the
// due jobs, counted up to limit, when the earliest one due later is due,
// and the server's clock (both in seconds since 1970); with queues, only those queues' jobs.
// It has no parameters (queryPinned sends it as text), and runs on a
// pinned search_path.
func customPollSQL(n names, d described, queues []string, limit int) string {
	e := jobExprs(n.job)
	where := customWhere(n, d, queues)
	table := d.table
	return `SELECT (SELECT count(*) FROM (SELECT 1 FROM ` + table + ` j WHERE ` + where + ` AND (` + e.dueNow + `) LIMIT ` + strconv.Itoa(limit) + `) p),
		(SELECT extract(epoch FROM min(` + e.dueAt + `))::float8 FROM ` + table + ` j WHERE ` + where + ` AND ` + e.dueLater + `),
		extract(epoch FROM clock_timestamp())::float8`
}

// customWhere is the condition of a JobTable's pending rows (the row is
// j), of the queues watched when there are any.
func customWhere(n names, d described, queues []string) string {
	where := `(` + d.pred + `)`
	if len(queues) > 0 {
		lits := make([]string, len(queues))
		for i, q := range queues {
			lits[i] = quoteLiteral(q)
		}
		where += ` AND ` + jobExprs(n.job).queue + ` = ANY (ARRAY[` + strings.Join(lits, ", ") + `]::text[])`
	}
	return where
}

// pinnedSearchPath is the search_path the trigger functions of a JobTable
// other than IHP's run on, and their polls: the server's reading of
// Pending names everything outside pg_catalog with its schema.
const pinnedSearchPath = "pg_catalog, pg_temp"

// queryPinned runs query, which has no parameters and returns one row, on
// pinnedSearchPath, set for its transaction only, and scans that row into
// dest. Both go in one simple-protocol message, so that the server parses
// and plans query only once the path is set: no statement prepared under
// the pool's own search_path is ever used, and nothing the pool's path
// holds picks an operator or function of query.
func queryPinned(ctx context.Context, pool *pgxpool.Pool, query string, dest ...any) error {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	results, err := c.Conn().PgConn().Exec(ctx,
		`SELECT pg_catalog.set_config('search_path', `+quoteLiteral(pinnedSearchPath)+`, true); `+query).ReadAll()
	if err != nil {
		return err
	}
	if len(results) != 2 || len(results[1].Rows) != 1 || len(results[1].Rows[0]) != len(dest) {
		return errors.New("pinned query: not one row of the expected columns")
	}
	fields, row, types := results[1].FieldDescriptions, results[1].Rows[0], c.Conn().TypeMap()
	for i := range dest {
		if err := types.Scan(fields[i].DataTypeOID, fields[i].Format, row[i], dest[i]); err != nil {
			return fmt.Errorf("pinned query: column %s: %w", fields[i].Name, err)
		}
	}
	return nil
}
