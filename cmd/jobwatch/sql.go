package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jobwatch-go/jobwatch"
)

// sqlCommand prints the script that installs (or, with -down, removes) a
// table's notification triggers, in the format of a migration tool.
func sqlCommand(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("sql", "TABLE [-format plain|goose|migrate] [-gate=false] [-down] [-pending COND] [-run-at COL] [-run-at-zone ZONE] [-queue COL]",
		"Prints the SQL that installs the notification triggers of TABLE, exactly as\n"+
			"jobwatch.CreateNotificationTriggerSQL returns it (CreateNotificationTriggerSQLFor\n"+
			"the description, when given): idempotent, one statement. Run it as the table's\n"+
			"owner (or a superuser); it fails, installing nothing, when the server refuses\n"+
			"the description. Formats:\n"+
			"  plain    the statement, for psql or golang-migrate (one file up, one -down)\n"+
			"  migrate  the same: golang-migrate runs a file as one multi-statement script\n"+
			"  goose    one goose file, up and down, each statement between StatementBegin\n"+
			"           and StatementEnd (goose cannot split a DO block itself)"+jobTableHelp)
	format := fs.String("format", "plain", "plain, migrate or goose")
	gate := fs.Bool("gate", true, "install the triggers with the notify gate (jobwatch.WithNotifyGate); -gate=false: every transaction notifies")
	down := fs.Bool("down", false, "print the SQL that removes them instead, for a down migration (plain and migrate)")
	jobTable := jobTableFlags(fs)
	table, code := parse(fs, args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := jobwatch.QuoteTableName(table); err != nil {
		fail(stderr, "sql", err)
		return exitUsage
	}
	job := jobTable()
	if err := checkJobTable(job, nil); err != nil {
		fail(stderr, "sql", err)
		return exitUsage
	}
	up := jobwatch.CreateNotificationTriggerSQLWith(table, jobwatch.WithNotifyGate(*gate), jobwatch.WithJobTable(job)) + ";\n"
	drop := jobwatch.DropNotificationTriggerSQL(table) + ";\n"
	switch *format {
	case "plain", "migrate":
		if *down {
			up = drop
		}
		fmt.Fprint(stdout, up)
	case "goose":
		if *down {
			fmt.Fprintln(stderr, "jobwatch sql: -format goose prints the up and the down migration in one file: leave out -down")
			return exitUsage
		}
		fmt.Fprint(stdout, "-- +goose Up\n-- +goose StatementBegin\n"+up+"-- +goose StatementEnd\n\n"+
			"-- +goose Down\n-- +goose StatementBegin\n"+drop+"-- +goose StatementEnd\n")
	default:
		fmt.Fprintf(stderr, "jobwatch sql: -format %q: want plain, migrate or goose\n", *format)
		return exitUsage
	}
	return exitOK
}
