// Package jobwatchtest gives integration tests a fresh, empty PostgreSQL
// database with nothing to set up.
//
// The server comes from the first of these that works:
//
//  1. TEST_DATABASE_URL, when it is set (it must work: a broken value fails
//     the test rather than quietly using something else);
//  2. a server already answering at pgx's defaults (the PG* variables, the
//     local socket, localhost:5432);
//  3. an ephemeral cluster made from locally installed PostgreSQL binaries
//     (pg_config --bindir, /usr/lib/postgresql/*/bin or PATH): initdb into a
//     temporary directory, started on a free port with fsync off, shared by
//     every test of the process and removed by Main when they end;
//  4. a PostgreSQL container, when a program imports
//     github.com/jobwatch-go/jobwatch/jobwatchtest/container (a module of its
//     own, with testcontainers-go) and a Docker engine answers.
//
// When none works the test fails with a message listing what was tried and
// how to fix it; it never skips.
//
// Use it from TestMain so the ephemeral cluster or container is removed at
// the end:
//
//	func TestMain(m *testing.M) { jobwatchtest.Main(m) }
//
// It is part of jobwatch's module, with no dependency beyond pgx, so that
// its version is always the library's; the container source is the
// separate module above, so that programs importing jobwatch never depend
// on testcontainers-go.
package jobwatchtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// EnvVar names the variable that points the tests at a server.
const EnvVar = pgtest.EnvVar

// SourceEnvVar, when set, names the one source to use: "url" (EnvVar),
// "default" (pgx's defaults), "ephemeral" or "container". The tests then fail
// rather than fall back to another, which proves a source works.
const SourceEnvVar = pgtest.SourceEnvVar

// UseContainer makes start the last source tried: a function that starts
// a PostgreSQL server (a container) and returns its connection string and
// a function that removes it, which Main (or Stop) calls. The container
// module calls it when imported; call it yourself to start a server your
// own way.
func UseContainer(start func(ctx context.Context) (connString string, stop func(), err error)) {
	pgtest.Container = func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		u, stop, err := start(ctx)
		if err != nil {
			return "", err
		}
		pgtest.RegisterStop(stop)
		return u, nil
	}
}

// Main runs the tests of m and then stops whatever server this package
// started (an ephemeral cluster or a container), and exits with the tests'
// exit code. Call it from TestMain.
func Main(m interface{ Run() int }) { pgtest.Main(m) }

// Stop stops and removes whatever server this package started. Main calls
// it; call it yourself from a TestMain that does not use Main.
func Stop() { pgtest.Stop() }

// ServerURL returns the connection string of the server databases are made
// on, finding or starting it on first use. It fails t when there is none.
func ServerURL(t testing.TB) string {
	t.Helper()
	u, err := pgtest.ServerURL()
	if err != nil {
		t.Fatal("jobwatchtest: ", err)
	}
	return u
}

// NewDatabaseURL creates a fresh, empty database for t and returns its
// connection string. The database is dropped (WITH (FORCE)) when t ends.
// Safe to call from parallel tests. Add settings to the connection string
// with WithParam.
func NewDatabaseURL(t testing.TB) string {
	t.Helper()
	u, drop, err := CreateDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := drop(); err != nil {
			t.Error(err)
		}
	})
	return u
}

// CreateDatabase is NewDatabaseURL for code that has no testing.TB, such as
// a TestMain fixture or an Example: it creates a fresh, empty database and
// returns its connection string and a function that drops it.
func CreateDatabase(ctx context.Context) (url string, drop func() error, err error) {
	u, dropDB, err := pgtest.CreateDatabase(ctx)
	if err != nil {
		return "", nil, fmt.Errorf("jobwatchtest: %w", err)
	}
	return u, func() error {
		if err := dropDB(); err != nil {
			return fmt.Errorf("jobwatchtest: %w", err)
		}
		return nil
	}, nil
}

// NewDatabase creates a fresh, empty database for t and returns a pool on
// it. The pool is closed and the database dropped when t ends. Safe to call
// from parallel tests.
func NewDatabase(t testing.TB) *pgxpool.Pool {
	t.Helper()
	u := NewDatabaseURL(t)
	pool, err := pgxpool.New(context.Background(), u)
	if err != nil {
		t.Fatalf("jobwatchtest: open pool: %v", err)
	}
	t.Cleanup(pool.Close) // runs before the drop, registered earlier
	return pool
}

// CreateJobTable creates an IHP-shaped job table, its job_status type and
// its pending-job index (jobwatch.CreateJobTableSQL) in the pool's database,
// failing t on error.
func CreateJobTable(t testing.TB, pool *pgxpool.Pool, tableName string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := pool.Exec(ctx, jobwatch.CreateJobTableSQL(tableName)); err != nil {
		t.Fatalf("jobwatchtest: create job table %s: %v", tableName, err)
	}
}

// WithParam returns connString with one more setting, key=value: a pgx or
// pgxpool setting (pool_max_conns), a libpq one (sslmode) or a server
// run-time parameter (application_name). It works on every form a
// connection string from this package can take: a postgres:// URL with or
// without a query string, a key=value DSN, and the empty string (pgx's
// defaults). A setting already present is replaced. Never append
// "&key=value" to a connection string yourself: that breaks the DSN and
// query-less forms.
//
//	url := jobwatchtest.NewDatabaseURL(t)
//	url, err := jobwatchtest.WithParam(url, "application_name", "my_test")
func WithParam(connString, key, value string) (string, error) {
	s, err := pgtest.WithParam(connString, key, value)
	if err != nil {
		return "", fmt.Errorf("jobwatchtest: %w", err)
	}
	return s, nil
}
