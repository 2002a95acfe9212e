// Command jobwatch helps run jobwatch in production: it prints the trigger
// SQL for a migration, diagnoses why workers are not woken, and shows a
// table's notifications as they happen.
//
//	jobwatch sql TABLE [-gate=false] [-down]
//	jobwatch doctor TABLE [-url URL] [-listener-url URL]
//	jobwatch tail TABLE [-url URL]
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
	"strings"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes.
const (
	exitOK      = 0
	exitProblem = 1 // a check did not pass, or the server could not be used
	exitUsage   = 2 // bad arguments
)

const usage = `jobwatch: tools for jobwatch, the watch layer of a PostgreSQL job queue.

Usage:
  jobwatch sql TABLE [-down]            print the trigger SQL for a migration
  jobwatch doctor TABLE [flags]         check why workers may not be woken
  jobwatch tail TABLE [flags]           print the table's notifications as they come

Connection: -url, else DATABASE_URL, else pgx's defaults. Run
"jobwatch COMMAND -h" for a command's flags.
`

// run runs one command and returns the process's exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	commands := map[string]func(context.Context, []string, io.Writer, io.Writer) int{
		"sql":    sqlCommand,
		"doctor": doctorCommand,
		"tail":   tailCommand,
	}
	name := args[0]
	if cmd, ok := commands[name]; ok {
		return cmd(ctx, args[1:], stdout, stderr)
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
