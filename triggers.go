package jobwatch

import (
	_ "embed"
	"strings"
	"text/template"
)

// CreateNotificationTriggerSQL returns one SQL statement (a DO block) that
// installs the notification triggers of a job table, or brings them up to
// date, and changes nothing when they are current. Run it in a migration
// when workers must not do DDL, as the table's owner or a superuser
// (objects a superuser creates are handed to the table's owner). It reads
// the catalog first and, when everything is in place, ends there: no lock,
// no DDL, so it also succeeds for a role without DDL rights. Otherwise it
// waits up to a second for any other installer, creates what is missing
// and enables what is disabled, in the table's own schema, taking the
// table lock with NOWAIT; it never drops a trigger. It fails with a clear
// message for a table that does not exist or lacks the job columns.
// docs/how-it-works.md describes the triggers, their payloads and the
// notify gate.
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
	if n, err = n.describedAs(o.job); err != nil {
		return raiseSQL(err)
	}
	return n.triggerSQL(o.gate, true)
}

// CreateNotificationTriggerSQLFor is CreateNotificationTriggerSQL for a
// table described by t (see JobTable): the triggers notify for the rows a
// statement leaves pending by t's reading. The script has PostgreSQL read
// t against the table first and fails, installing nothing, with the
// reason in its message, when t cannot be watched (ErrInvalidJobTable's
// cases); text that could end the script makes it a statement that
// raises that error. It replaces triggers installed for another
// description. CreateNotificationTriggerSQLFor(n, IHPJobTable) is
// CreateNotificationTriggerSQL(n).
func CreateNotificationTriggerSQLFor(tableName string, t JobTable) string {
	return CreateNotificationTriggerSQLWith(tableName, WithJobTable(t))
}

// DropNotificationTriggerSQL returns SQL that removes what
// CreateNotificationTriggerSQL installs, for a down migration: jobwatch's
// trigger functions and, with them, every trigger that calls them, on the
// table and on its partitions, the skip counter, and IHP's trigger
// function when jobwatch's script created it and no trigger calls it.
// IHP's own triggers and their function stay. For a name that is not a
// valid table name the statement raises an error when run.
func DropNotificationTriggerSQL(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return raiseSQL(err)
	}
	d := n.sqlData(false, true)
	d.IHPBodyQuoted = dollarQuote("jobwatch_fn", n.ihpBody())
	return "DO " + dollarQuote("jobwatch", n.render("drop", d))
}

// raiseSQL returns a statement that fails with err's message when run.
func raiseSQL(err error) string {
	return "DO " + dollarQuote("jobwatch",
		" BEGIN RAISE EXCEPTION '%', "+quoteLiteral("jobwatch: "+err.Error())+" USING ERRCODE = '"+sqlstateInvalidName+"'; END ")
}

// transitionTable is the name the statement triggers give their NEW TABLE.
const transitionTable = "jobwatch_new_rows"

//go:embed triggers.sql
var triggersTemplate string

// scripts are the templates of triggers.sql.
var scripts = template.Must(template.New("triggers.sql").
	Funcs(template.FuncMap{"lit": quoteLiteral}).
	Parse(triggersTemplate))

// scriptData is what the templates read: names as they appear in SQL.
// Fields ending in Fmt go into a function body, which the script passes
// through format(), so their % signs are doubled.
type scriptData struct {
	Raw, TableQuoted, TableFmt, IHPSchemaKey                             string
	Function, RowFunction, IHPFunction, Counter                          string
	InsertTrigger, UpdateTrigger, PartInsertTrigger, PartUpdateTrigger   string
	RowTrigger, TransitionTable, PendingArray, PendingStatusesInLiteral  string
	RunAtTypes                                                           string
	ChannelFmt, SettingFmt, Prefix, PayloadDue, PayloadAt, PayloadPoll   string
	OwnsIHPFunction, Gate, MayPartition                                  bool
	NotifyKey, SkipKey                                                   int64
	Bound, MaxDue                                                        int
	Tbl, StmtBody, RowBody, StmtBodyQuoted, RowBodyQuoted, IHPBodyQuoted string // set per use

	// A JobTable other than IHP's (Custom): the description's parts as
	// the "describe" template checks them, and the expressions the
	// function body uses (Fmt rules apply).
	Custom                                  bool
	PendingText, ZoneText, DescribedSetting string
	RunAtLit, ZoneLit, QueueLit             string
	DescColumns                             []descColumn
	InvalidCode                             string
	QueueExpr, DueNow, DueAt, DueLater      string
	MaxQueueTag                             int
	Pred, Record                            string // set per use: where the server's reading is
}

// descColumn is a column a JobTable names, and what its type must be.
type descColumn struct{ Field, Name, Check, Want string }

func (n names) sqlData(gate, mayPartition bool) *scriptData {
	fmtLit := func(s string) string { return strings.ReplaceAll(quoteLiteral(s), "%", "%%") }
	schemaKey := "pg_catalog.current_schema()"
	if n.table.schema != "" {
		schemaKey = quoteLiteral(n.table.schema)
	}
	// The transaction's id first, the same in every statement's
	// notifications of a transaction, so that PostgreSQL still merges
	// identical ones.
	prefix := "pg_catalog.concat(" + quoteLiteral(payloadKey) + ", pg_catalog.txid_current(), ' ')"
	if gate {
		prefix = "pg_catalog.concat(" + quoteLiteral(payloadKey) + ", pg_catalog.txid_current(), ' ', " + quoteLiteral(payloadGated) + ")"
	}
	d := &scriptData{
		Raw: n.table.raw, TableQuoted: n.table.quoted(), TableFmt: strings.ReplaceAll(n.table.quoted(), "%", "%%"),
		IHPSchemaKey: schemaKey,
		Function:     n.function, RowFunction: n.rowFunction, IHPFunction: n.ihpFunction, Counter: n.counter,
		InsertTrigger: n.insertTrigger, UpdateTrigger: n.updateTrigger,
		PartInsertTrigger: n.partInsertTrigger, PartUpdateTrigger: n.partUpdateTrigger, RowTrigger: n.rowTrigger,
		TransitionTable: transitionTable, PendingArray: pendingStatusArray, RunAtTypes: runAtTypes,
		PendingStatusesInLiteral: strings.ReplaceAll(pendingStatuses, "'", "''"),
		ChannelFmt:               fmtLit(n.channel), SettingFmt: fmtLit(n.setting), Prefix: prefix,
		PayloadDue: payloadDue, PayloadAt: payloadAt, PayloadPoll: payloadPoll,
		OwnsIHPFunction: n.ownsIHPFunction, Gate: gate, MayPartition: mayPartition,
		NotifyKey: n.notifyKey, SkipKey: n.skipKey,
		Bound: maxAnnouncements, MaxDue: maxDueCount,
	}
	if n.custom() {
		d.setJobTable(n.job)
	}
	return d
}

// setJobTable fills in what the templates need for a JobTable other than
// IHP's.
func (d *scriptData) setJobTable(t JobTable) {
	litOrNull := func(s string) string {
		if s == "" {
			return "NULL::pg_catalog.text"
		}
		return quoteLiteral(s)
	}
	d.Custom, d.OwnsIHPFunction = true, false
	d.PendingText, d.ZoneText, d.DescribedSetting = strings.TrimSpace(t.Pending), t.RunAtTimeZone, describedSetting
	d.RunAtLit, d.ZoneLit, d.QueueLit = litOrNull(t.RunAt), litOrNull(t.RunAtTimeZone), litOrNull(t.Queue)
	d.InvalidCode, d.MaxQueueTag = sqlstateInvalidDescription, maxQueueTag
	if t.Queue != "" {
		d.DescColumns = append(d.DescColumns, descColumn{Field: "Queue", Name: t.Queue,
			Check: "category = 'S'", Want: "of a string type (text, varchar, char, name)"})
	}
	if t.RunAt != "" {
		c := descColumn{Field: "RunAt", Name: t.RunAt, Check: "typ IN (" + runAtTypes + ")",
			Want: "a timestamp, with time zone or without (then read in RunAtTimeZone, else in the session TimeZone)"}
		if t.RunAtTimeZone != "" {
			c.Check, c.Want = "typ = 'timestamp without time zone'", "a timestamp without time zone, as RunAtTimeZone is set"
		}
		d.DescColumns = append(d.DescColumns, c)
	}
	// The body is a format() string.
	e, esc := jobExprs(t), func(s string) string { return strings.ReplaceAll(s, "%", "%%") }
	d.QueueExpr, d.DueNow, d.DueAt, d.DueLater = esc(e.queue), esc(e.dueNow), esc(e.dueAt), esc(e.dueLater)
}

// render executes one template of triggers.sql. The templates are
// constants and their data always complete, so an error is a bug of this
// package, caught by every test that installs triggers.
func (n names) render(name string, d *scriptData) string {
	var b strings.Builder
	if err := scripts.ExecuteTemplate(&b, name, d); err != nil {
		panic("jobwatch: template " + name + ": " + err.Error())
	}
	return b.String()
}

// statementBody is the body of jobwatch_notify_<table>, which the
// statement triggers call, as a format() string: %1$L stands for the skip
// counter's schema-qualified name; for a JobTable other than IHP's, %2$s
// for the server's reading of Pending and %3$s for the description's
// record.
func (n names) statementBody(gate bool) string {
	return n.render("stmt_body", n.sqlData(gate, true))
}

// rowBody is the body of the row trigger function a partitioned table
// gets, as a format() string.
func (n names) rowBody() string { return n.render("row_body", n.sqlData(false, true)) }

// ihpBody is IHP's body of notify_job_queued_<table>, to the byte, so that
// an IHP worker and jobwatch never see each other's version as different.
func (n names) ihpBody() string {
	return "BEGIN\n    PERFORM pg_notify(" + quoteLiteral(n.channel) + ", '');\n    RETURN new;\nEND;\n"
}

// stateSQL is the query that says what of the installation is in place,
// for the table named by $1 (quoted) with the bodies $2 and $3 (see
// statementBody and rowBody) and, for a JobTable other than IHP's, the
// server's reading of it, $4 and $5 (see described). It returns no row
// when the table does not exist. The install script runs the same query.
// Its last column, which the script does not read, is the record of the
// description the installed function was made for (NULL: IHP's).
func (n names) stateSQL(gate bool) string {
	d := n.sqlData(gate, true)
	d.Tbl, d.StmtBody, d.RowBody, d.Pred, d.Record = "to_regclass($1::text)", "$2::text", "$3::text", "$4::text", "$5::text"
	return "SELECT s.*, (SELECT substring(p.prosrc FROM " + quoteLiteral(`\n-- jobwatch job table: ([^\n]*)`) + `)
          FROM pg_class c JOIN pg_proc p ON p.pronamespace = c.relnamespace
         WHERE c.oid = to_regclass($1::text) AND p.proname = ` + quoteLiteral(n.function) + ` AND p.pronargs = 0) AS installed
  FROM (` + n.render("state", d) + `) s`
}

// describeSQL is a DO statement that has the server read the table's
// JobTable ("describe" in triggers.sql) and leaves its reading in the
// describedSetting's settings, for the rest of the transaction: the
// Pending expression, the record and the table's qualified name.
func (n names) describeSQL() string {
	return "DO " + dollarQuote("jobwatch", n.render("describe_only", n.sqlData(false, true)))
}

// triggerSQL is the install script (see CreateNotificationTriggerSQL).
// Without mayPartition it leaves out the partitions' part, and fails with
// ErrTriggersBusy's SQLSTATE when the table is partitioned.
func (n names) triggerSQL(gate, mayPartition bool) string {
	d := n.sqlData(gate, mayPartition)
	d.Tbl, d.StmtBody, d.RowBody, d.Pred, d.Record = "tbl", "stmt_body", "row_body", "pred", "described"
	d.StmtBodyQuoted = dollarQuote("jobwatch_fn", n.render("stmt_body", d))
	d.RowBodyQuoted = dollarQuote("jobwatch_fn", n.render("row_body", d))
	d.IHPBodyQuoted = dollarQuote("jobwatch_fn", n.ihpBody())
	return "DO " + dollarQuote("jobwatch", n.render("script", d))
}
