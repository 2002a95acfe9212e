package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jobwatch-go/jobwatch"
)

// sqlCommand prints the script that installs (or, with -down, removes) a
// table's notification triggers.
func sqlCommand(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("sql", "TABLE [-gate=false] [-down]",
		"Prints the SQL that installs the notification triggers of TABLE, exactly as\n"+
			"jobwatch.CreateNotificationTriggerSQL returns it: one statement, idempotent,\n"+
			"ready for goose, golang-migrate, Atlas or psql. Run it as the table's owner.")
	gate := fs.Bool("gate", true, "install the triggers with the notify gate (jobwatch.WithNotifyGate); -gate=false: every transaction notifies")
	down := fs.Bool("down", false, "print the SQL that removes them instead, for a down migration")
	table, code := parse(fs, args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := jobwatch.QuoteTableName(table); err != nil {
		fail(stderr, "sql", err)
		return exitUsage
	}
	switch {
	case *down:
		fmt.Fprint(stdout, jobwatch.DropNotificationTriggerSQL(table))
	default:
		fmt.Fprintln(stdout, jobwatch.CreateNotificationTriggerSQLWith(table, jobwatch.WithNotifyGate(*gate))+";")
	}
	return exitOK
}
