package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// tailCommand prints a table's notifications as they arrive, until the
// context ends (Ctrl-C).
func tailCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("tail", "TABLE [-url URL] [-pending COND] [-run-at COL] [-run-at-zone ZONE] [-queue COL] [-queues A,B]",
		"LISTENs on the table's channel and prints each notification as it arrives: the\n"+
			"time, the payload and what it announces (the queue too, for a table with a\n"+
			"queue column). Ctrl-C ends it. With a description, the server reads it against\n"+
			"the table first, as the doctor does: one it refuses is an error (exit 1), and\n"+
			"triggers made for another description are reported."+jobTableHelp)
	url := fs.String("url", "", "connection string (default DATABASE_URL, else pgx's defaults); a session, not a transaction-mode pooler")
	jobTable := jobTableFlags(fs)
	queueList := fs.String("queues", "", "comma-separated `queues`: print only what a watch with jobwatch.WithQueues wakes for,\n"+
		"their notifications and those that name no queue (needs -queue; an empty name is the queue '')")
	table, code := parse(fs, args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := jobwatch.QuoteTableName(table); err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	job := jobTable()
	var queues map[string]bool // nil: every queue
	var queueNames []string
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "queues" {
			queueNames = strings.Split(*queueList, ",")
		}
	})
	if queueNames != nil && job.Queue == "" {
		fmt.Fprintln(stderr, "jobwatch tail: -queues needs -queue, the table's queue column")
		return exitUsage
	}
	if err := checkJobTable(job, queueNames); err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	if queueNames != nil {
		queues = make(map[string]bool, len(queueNames))
		for _, q := range queueNames {
			queues[q] = true
		}
	}
	// The table first: listening to a table that is not there would
	// print nothing, for ever.
	pool, err := pgxpool.New(ctx, connString(*url))
	if err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	if job == jobwatch.IHPJobTable {
		healthy, err := jobwatch.NotificationTriggersHealthy(ctx, pool, table)
		pool.Close()
		switch {
		case err != nil:
			fail(stderr, "tail", err)
			return exitError
		case !healthy:
			fmt.Fprintf(stderr, "jobwatch tail: the notification triggers of %s are not in place: nothing notifies until they are (jobwatch doctor %s says why)\n", table, table)
		}
	} else {
		ok := checkDescribed(ctx, pool, connString(*url), table, job, stderr)
		pool.Close()
		if !ok {
			return exitError
		}
	}
	// Until it is connected a failure is this command's to report, once.
	var connected atomic.Bool
	logger := slog.New(afterConnect{&connected, slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})})
	l, err := jobwatch.NewListener(connString(*url), jobwatch.WithLogger(logger))
	if err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	defer l.Close()
	var mu sync.Mutex // the callback and this goroutine both write
	channel := jobwatch.ChannelName(table)
	if _, err := l.Subscribe(channel, func(n jobwatch.Notification) {
		p := jobwatch.ParsePayload(n.Payload)
		if p.Queued && queues != nil && !queues[p.Queue] {
			return // another queue's jobs, as a watch with WithQueues skips them
		}
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(stdout, "%s  %-24q %s\n", time.Now().UTC().Format("2006-01-02T15:04:05.000Z"), n.Payload, p)
	}); err != nil {
		fail(stderr, "tail", err)
		return exitError
	}
	if s := l.Stats(); !s.Connected {
		fail(stderr, "tail", fmt.Errorf("cannot listen: %w", s.LastError))
		return exitError
	}
	connected.Store(true)
	mu.Lock()
	if queues != nil {
		fmt.Fprintf(stdout, "listening on %s for queue(s) %q (Ctrl-C to stop)\n", channel, queueNames)
	} else {
		fmt.Fprintf(stdout, "listening on %s (Ctrl-C to stop)\n", channel)
	}
	mu.Unlock()
	<-ctx.Done()
	return exitOK
}

// checkDescribed has the doctor's table and triggers checks read job
// against the table (jobwatch.Diagnose), and reports whether tail can go
// on: not when the server cannot be queried, the table is not there or
// the server refuses the description. Triggers that fail their check (not
// in place, or made for another description) are reported on stderr.
func checkDescribed(ctx context.Context, pool *pgxpool.Pool, url, table string, job jobwatch.JobTable, stderr io.Writer) bool {
	findings, err := jobwatch.Diagnose(ctx, pool, url, table, jobwatch.WithJobTable(job))
	if err != nil && len(findings) == 0 {
		fail(stderr, "tail", err)
		return false
	}
	for _, f := range findings {
		switch {
		case f.Status != jobwatch.StatusFail:
		case f.Check == "server" || f.Check == "table":
			fmt.Fprintf(stderr, "jobwatch tail: %s\n", oneLine(f.Detail))
			return false
		case f.Check == "triggers":
			fmt.Fprintf(stderr, "jobwatch tail: the notification triggers of %s: %s (jobwatch doctor %s, with this description, says more)\n",
				table, oneLine(f.Detail), table)
		}
	}
	return true
}

// afterConnect passes log records on once connected is set.
type afterConnect struct {
	connected *atomic.Bool
	slog.Handler
}

func (h afterConnect) Enabled(ctx context.Context, l slog.Level) bool {
	return h.connected.Load() && h.Handler.Enabled(ctx, l)
}

func (h afterConnect) WithAttrs(attrs []slog.Attr) slog.Handler {
	return afterConnect{h.connected, h.Handler.WithAttrs(attrs)}
}

func (h afterConnect) WithGroup(name string) slog.Handler {
	return afterConnect{h.connected, h.Handler.WithGroup(name)}
}
