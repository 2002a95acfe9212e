package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// doctorCommand runs jobwatch.Diagnose and prints one line per check, or
// a JSON document.
func doctorCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("doctor", "TABLE [-url URL] [-listener-url URL] [-json] [-timeout D] [-pending COND] [-run-at COL] [-run-at-zone ZONE] [-queue COL]",
		"Checks everything jobwatch knows can keep workers from being woken, and prints\n"+
			"one line per check, OK, WARN or FAIL, with what to do. Exit codes: 0 every\n"+
			"check OK, 1 some warn, 2 one fails, 3 nothing could be checked (the server\n"+
			"did not answer, or -timeout passed first), 64 bad arguments. A description\n"+
			"the server refuses against the table fails the table check (2); one refused\n"+
			"before it is read (a semicolon, a comment, an unbalanced quote) is a bad\n"+
			"argument (64)."+jobTableHelp)
	url := fs.String("url", "", "connection string of the workers' pool (default DATABASE_URL, else pgx's defaults)")
	listenerURL := fs.String("listener-url", "", "connection string of the workers' Listener, when it differs (default: -url)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	asJSON := fs.Bool("json", false, "print a JSON document instead of lines")
	jobTable := jobTableFlags(fs)
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
	findings, err := jobwatch.Diagnose(ctx, pool, *listenerURL, table, jobwatch.WithJobTable(jobTable()))
	var notChecked error
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		notChecked = fmt.Errorf("-timeout %v passed before every check ran: allow more time", *timeout)
	case err != nil:
		fail(stderr, "doctor", err)
		return exitUsage
	case len(findings) > 0 && findings[0].Check == "server" && findings[0].Err != nil:
		notChecked = fmt.Errorf("the server did not answer: %w", findings[0].Err)
	}
	code, summary := verdict(findings, notChecked)
	if *asJSON {
		printJSON(stdout, table, findings, code, summary)
	} else {
		printLines(stdout, findings, summary)
	}
	if notChecked != nil {
		fail(stderr, "doctor", notChecked)
	}
	return code
}

// verdict is the exit code and the last line of a doctor run.
func verdict(findings []jobwatch.Finding, notChecked error) (int, string) {
	var warn, failed int
	for _, f := range findings {
		switch f.Status {
		case jobwatch.StatusWarn:
			warn++
		case jobwatch.StatusFail:
			failed++
		}
	}
	switch {
	case notChecked != nil:
		return exitNoCheck, "not checked: " + oneLine(notChecked.Error())
	case failed > 0:
		return exitFail, fmt.Sprintf("%d of %d checks failed, %d warn", failed, len(findings), warn)
	case warn > 0:
		return exitWarn, fmt.Sprintf("%d of %d checks warn", warn, len(findings))
	}
	return exitOK, fmt.Sprintf("all %d checks OK", len(findings))
}

func printLines(w io.Writer, findings []jobwatch.Finding, summary string) {
	for _, f := range findings {
		fmt.Fprintf(w, "%-5s %-13s %s\n", f.Status, f.Check, oneLine(f.Detail))
		if f.Fix != "" {
			fmt.Fprintf(w, "%-19s fix: %s\n", "", oneLine(f.Fix))
		}
	}
	fmt.Fprintln(w, summary)
}

// doctorReport is the -json document.
type doctorReport struct {
	Table    string          `json:"table"`
	ExitCode int             `json:"exit_code"`
	Summary  string          `json:"summary"`
	Findings []doctorFinding `json:"findings"`
}

type doctorFinding struct {
	Check  string `json:"check"`
	Status string `json:"status"` // OK, WARN or FAIL
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
	Error  string `json:"error,omitempty"`
}

func printJSON(w io.Writer, table string, findings []jobwatch.Finding, code int, summary string) {
	r := doctorReport{Table: table, ExitCode: code, Summary: summary, Findings: []doctorFinding{}}
	for _, f := range findings {
		df := doctorFinding{Check: f.Check, Status: f.Status.String(), Detail: oneLine(f.Detail), Fix: oneLine(f.Fix)}
		if f.Err != nil {
			df.Error = oneLine(f.Err.Error())
		}
		r.Findings = append(r.Findings, df)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(r) // a write error is the caller's (checkedWriter)
}
