package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// tailCommand prints a table's notifications as they arrive, until the
// context ends (Ctrl-C).
func tailCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("tail", "TABLE [-url URL]",
		"LISTENs on the table's channel and prints each notification as it arrives: the\n"+
			"time, the payload and what it announces. Ctrl-C ends it.")
	url := fs.String("url", "", "connection string (default DATABASE_URL, else pgx's defaults); a session, not a transaction-mode pooler")
	table, code := parse(fs, args, stderr)
	if code >= 0 {
		return code
	}
	if _, err := jobwatch.QuoteTableName(table); err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	// The table first: listening to a table that is not there would
	// print nothing, for ever.
	pool, err := pgxpool.New(ctx, connString(*url))
	if err != nil {
		fail(stderr, "tail", err)
		return exitUsage
	}
	healthy, err := jobwatch.NotificationTriggersHealthy(ctx, pool, table)
	pool.Close()
	switch {
	case err != nil:
		fail(stderr, "tail", err)
		return exitError
	case !healthy:
		fmt.Fprintf(stderr, "jobwatch tail: the notification triggers of %s are not in place: nothing notifies until they are (jobwatch doctor %s says why)\n", table, table)
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
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(stdout, "%s  %-12q %s\n", time.Now().UTC().Format("2006-01-02T15:04:05.000Z"), n.Payload, jobwatch.ParsePayload(n.Payload))
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
	fmt.Fprintf(stdout, "listening on %s (Ctrl-C to stop)\n", channel)
	mu.Unlock()
	<-ctx.Done()
	return exitOK
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
