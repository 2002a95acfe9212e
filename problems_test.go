package jobwatch

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// TestProblemLogPassing: a brief condition (a lock held for a moment)
// between two occurrences of a standing problem is logged at debug level
// only, and the standing problem is not said again; with nothing standing
// it is logged like any problem, and a real change of problem is said.
func TestProblemLogPassing(t *testing.T) {
	var buf bytes.Buffer
	p := &problemLog{
		log:    slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})),
		remind: time.Hour,
	}
	lines := func(s string) int { return strings.Count(buf.String(), s) }

	p.report(slog.LevelError, "permission", "may not")
	p.passing(slog.LevelInfo, "busy", "lock held")
	p.report(slog.LevelError, "permission", "may not")
	if n := lines("level=ERROR msg=\"may not\""); n != 1 {
		t.Errorf("the standing problem was said %d times, want 1:\n%s", n, buf.String())
	}
	if n := lines("level=DEBUG msg=\"lock held\""); n != 1 {
		t.Errorf("the passing condition at debug: %d lines, want 1:\n%s", n, buf.String())
	}

	p.clear("fixed")
	p.passing(slog.LevelInfo, "busy", "lock held")
	p.passing(slog.LevelInfo, "busy", "lock held")
	if n := lines("level=INFO msg=\"lock held\""); n != 1 {
		t.Errorf("with nothing standing, the passing condition is said once: %d lines:\n%s", n, buf.String())
	}
	p.report(slog.LevelError, "permission", "may not")
	if n := lines("level=ERROR msg=\"may not\""); n != 2 {
		t.Errorf("a new problem after a cleared one is said: %d lines, want 2:\n%s", n, buf.String())
	}
}

// TestDiagnoseErrorOnePrefix: Diagnose's error for a connection string
// that cannot be parsed says "jobwatch: " once, then the steps.
func TestDiagnoseErrorOnePrefix(t *testing.T) {
	_, err := Diagnose(context.Background(), &pgxpool.Pool{}, "host=x port=notaport", "jobs")
	if err == nil || strings.Count(err.Error(), "jobwatch: ") != 1 ||
		!strings.HasPrefix(err.Error(), "jobwatch: diagnose jobs: listener: parse connection string: ") {
		t.Fatalf("got %v", err)
	}
}

// TestConnLogNetworkErrorsOneLine: connection failures that differ only
// in their addresses (a reset seen from another ephemeral port each time)
// are one problem, said once.
func TestConnLogNetworkErrorsOneLine(t *testing.T) {
	var buf bytes.Buffer
	c := connLog{problems: problemLog{log: slog.New(slog.NewTextHandler(&buf, nil)), remind: time.Hour}}
	for port := 40000; port < 40005; port++ {
		err := &net.OpError{Op: "read", Net: "tcp",
			Source: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5432},
			Err: &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}}
		c.failed(false, fmt.Errorf("listener: connect: %w", err))
	}
	if n := strings.Count(buf.String(), "cannot connect"); n != 1 {
		t.Fatalf("%d lines:\n%s", n, buf.String())
	}
}
