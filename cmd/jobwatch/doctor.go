package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// doctorCommand runs jobwatch.Diagnose and prints one line per check.
func doctorCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("doctor", "TABLE [-url URL] [-listener-url URL] [-timeout D]",
		"Checks everything jobwatch knows can keep workers from being woken, and prints\n"+
			"one line per check, OK, WARN or FAIL, with what to do. It exits 0 only when\n"+
			"every check is OK, so it can gate a deploy.")
	url := fs.String("url", "", "connection string of the workers' pool (default DATABASE_URL, else pgx's defaults)")
	listenerURL := fs.String("listener-url", "", "connection string of the workers' Listener, when it differs (default: -url)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	table, code := parse(fs, args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := jobwatch.QuoteTableName(table); err != nil {
		fail(stderr, "doctor", err)
		return exitUsage
	}
	poolURL := connString(*url)
	if *listenerURL == "" {
		*listenerURL = poolURL
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	pool, err := pgxpool.New(ctx, poolURL)
	if err != nil {
		fail(stderr, "doctor", err)
		return exitUsage
	}
	defer pool.Close()
	findings, err := jobwatch.Diagnose(ctx, pool, *listenerURL, table)
	if err != nil {
		fail(stderr, "doctor", err)
		return exitUsage
	}
	bad := 0
	for _, f := range findings {
		fmt.Fprintf(stdout, "%-5s %-13s %s\n", f.Status, f.Check, oneLine(f.Detail))
		if f.Fix != "" {
			fmt.Fprintf(stdout, "%-19s fix: %s\n", "", oneLine(f.Fix))
		}
		if f.Status != jobwatch.StatusOK {
			bad++
		}
	}
	if bad > 0 {
		fmt.Fprintf(stdout, "%d of %d checks not OK\n", bad, len(findings))
		return exitProblem
	}
	fmt.Fprintf(stdout, "all %d checks OK\n", len(findings))
	return exitOK
}
