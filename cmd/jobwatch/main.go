// Command jobwatch helps run jobwatch in production: it prints the trigger
// SQL for a migration, diagnoses why workers are not woken, and shows a
// table's notifications as they happen.
//
//	jobwatch sql TABLE [-format plain|goose|migrate] [-gate=false] [-down] [DESCRIPTION]
//	jobwatch doctor TABLE [-url URL] [-listener-url URL] [-json] [-timeout D] [DESCRIPTION]
//	jobwatch tail TABLE [-url URL] [DESCRIPTION] [-queues A,B]
//	jobwatch version
//
// DESCRIPTION describes a job table other than IHP's, a jobwatch.JobTable:
// -pending COND, -run-at COL, -run-at-zone ZONE, -queue COL. Without any of
// them the table is IHP's (jobwatch.IHPJobTable); with any, the fields not
// given are "", so a table with a due-time column needs -run-at. A
// description refused before the server reads it (a semicolon, a comment,
// an unbalanced quote) is a bad argument; one the server refuses against
// the table fails doctor's table check, and is an error for tail.
//
// Exit codes, as pg_isready's, for scripts: doctor exits 0 when every
// check is OK, 1 when some only warn, 2 when one fails (workers are not
// woken, or will not be), and 3 when it could not check (the server did
// not answer, or -timeout passed first). sql, tail and version exit 0 on
// success and 1 on an error (a table that does not exist, output that
// could not be written). Bad arguments exit 64 (EX_USAGE).
//
// It connects like the library: the -url flag, else DATABASE_URL, else
// pgx's defaults (PG* variables, the local socket, localhost:5432); a URL
// or a key=value DSN.
//
//	go run github.com/jobwatch-go/jobwatch/cmd/jobwatch@latest doctor jobs
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"unicode/utf8"

	"github.com/jobwatch-go/jobwatch"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes (see the package comment).
const (
	exitOK      = 0
	exitWarn    = 1 // doctor: some checks warn; the other commands: an error
	exitFail    = 2 // doctor: a check fails
	exitNoCheck = 3 // doctor: nothing could be checked
	exitUsage   = 64
)

// exitError is the other commands' exit code for an error.
const exitError = exitWarn

const usage = `jobwatch: tools for jobwatch, the watch layer of a PostgreSQL job queue.

Usage:
  jobwatch sql TABLE [flags]            print the trigger SQL for a migration
  jobwatch doctor TABLE [flags]         check why workers may not be woken
  jobwatch tail TABLE [flags]           print the table's notifications as they come
  jobwatch version                      print the version

Connection: -url, else DATABASE_URL, else pgx's defaults. Job table: IHP's,
unless -pending, -run-at, -run-at-zone or -queue describe another (sql, doctor
and tail; give each the same). Run "jobwatch COMMAND -h" for a command's flags.
`

// run runs one command and returns the process's exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	commands := map[string]func(context.Context, []string, io.Writer, io.Writer) int{
		"sql":     sqlCommand,
		"doctor":  doctorCommand,
		"tail":    tailCommand,
		"version": versionCommand,
	}
	name := args[0]
	if cmd, ok := commands[name]; ok {
		out := &checkedWriter{w: stdout}
		code := cmd(ctx, args[1:], out, stderr)
		if out.err != nil {
			fmt.Fprintf(stderr, "jobwatch %s: write the output: %v\n", name, out.err)
			if code == exitOK || name != "doctor" {
				code = exitError
			}
		}
		return code
	}
	switch name {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "jobwatch: unknown command %q\n\n%s", name, usage)
	return exitUsage
}

// parse parses a command's flags and its one TABLE argument. It returns
// the exit code to return at once, or -1 to go on.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) (table string, code int) {
	fs.SetOutput(stderr)
	// Flags may come before or after TABLE.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return "", exitOK
			}
			return "", exitUsage
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) != 1 {
		fmt.Fprintf(stderr, "jobwatch %s: want one TABLE argument, got %d\n", fs.Name(), len(positional))
		fs.Usage()
		return "", exitUsage
	}
	return positional[0], -1
}

// connString is the connection string: the flag, else DATABASE_URL.
func connString(flagValue string) string {
	if flagValue != "" {
		return flagValue
	}
	return os.Getenv("DATABASE_URL")
}

// newFlagSet makes a command's flag set with a usage line.
func newFlagSet(name, synopsis, about string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: jobwatch %s %s\n\n%s\n", name, synopsis, about)
		fs.PrintDefaults()
	}
	return fs
}

// jobTableHelp ends the help of the commands that take jobTableFlags.
const jobTableHelp = "\n\nThe job table is IHP's (jobwatch.IHPJobTable) unless -pending, -run-at,\n" +
	"-run-at-zone or -queue is given: then it is the jobwatch.JobTable they describe,\n" +
	"the fields not given empty (give -run-at for a due-time column). Give sql, doctor,\n" +
	"tail and the workers the same description."

// jobTableFlags defines on fs the flags that describe the job table (see
// jobwatch.JobTable). The func it returns, once fs is parsed, gives the
// description: jobwatch.IHPJobTable when none of the flags was given, else
// the JobTable of those that were, the others "".
func jobTableFlags(fs *flag.FlagSet) func() jobwatch.JobTable {
	var t jobwatch.JobTable
	fs.StringVar(&t.Pending, "pending", "", "`condition` over the table's own columns that holds while a job waits, as in CREATE INDEX ... WHERE\n"+
		"(JobTable.Pending; \"\": every row waits)")
	fs.StringVar(&t.RunAt, "run-at", "", "the due-time `column`, timestamptz or timestamp (JobTable.RunAt; \"\": every pending row is due at once)")
	fs.StringVar(&t.RunAtTimeZone, "run-at-zone", "", "the time `zone` a timestamp-without-time-zone -run-at is written in, e.g. UTC (JobTable.RunAtTimeZone)")
	fs.StringVar(&t.Queue, "queue", "", "the queue `column`, of a string type (JobTable.Queue)")
	return func() jobwatch.JobTable {
		given := false
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "pending", "run-at", "run-at-zone", "queue":
				given = true
			}
		})
		if !given {
			return jobwatch.IHPJobTable
		}
		return t
	}
}

// checkJobTable returns the library's error, without a server, for a
// description that no table could be watched with, or for queues that are
// not names.
func checkJobTable(t jobwatch.JobTable, queues []string) error {
	if err := t.Validate(); err != nil {
		return err
	}
	for _, q := range queues {
		if strings.IndexByte(q, 0) >= 0 || !utf8.ValidString(q) {
			return fmt.Errorf("%w: -queues: WithQueues(%q): not valid UTF-8 text without NUL", jobwatch.ErrInvalidOption, q)
		}
	}
	return nil
}

// fail prints err for command, on one line and without the library's
// "jobwatch: " prefix, which the command's name replaces.
func fail(stderr io.Writer, command string, err error) {
	fmt.Fprintf(stderr, "jobwatch %s: %s\n", command, oneLine(strings.TrimPrefix(err.Error(), "jobwatch: ")))
}

// oneLine folds a multi-line message (pgx lists each host tried on a line
// of its own) into one.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// checkedWriter keeps the first write error, so that a command whose
// output went nowhere (a full disk, a closed pipe) does not exit 0.
type checkedWriter struct {
	w   io.Writer
	mu  sync.Mutex
	err error
}

func (c *checkedWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.err = err
	return n, err
}

// versionCommand prints the version this binary was built from: the
// module's version when installed with go install ...@version, else the
// commit of the checkout it was built in.
func versionCommand(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("version", "", "Prints jobwatch's version, and the Go version it was built with.")
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	version := "(unknown)"
	if info, ok := debug.ReadBuildInfo(); ok {
		version = info.Main.Version
		var rev, modified string
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value
			}
		}
		if rev != "" && (version == "" || version == "(devel)") {
			version = "devel " + rev
			if modified == "true" {
				version += " (modified)"
			}
		}
	}
	fmt.Fprintf(stdout, "jobwatch %s, %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return exitOK
}
