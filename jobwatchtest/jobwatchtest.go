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
//  4. a PostgreSQL container started with testcontainers-go when a Docker
//     engine answers.
//
// When none works the test fails with a message listing what was tried and
// how to fix it; it never skips.
//
// Use it from TestMain so the ephemeral cluster or container is removed at
// the end:
//
//	func TestMain(m *testing.M) { jobwatchtest.Main(m) }
package jobwatchtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// EnvVar names the variable that points the tests at a server.
const EnvVar = "TEST_DATABASE_URL"

// SourceEnvVar, when set, names the one source to use: "url" (EnvVar),
// "default" (pgx's defaults), "ephemeral" or "container". The tests then fail
// rather than fall back to another, which proves a source works.
const SourceEnvVar = "JOBWATCHTEST_SOURCE"

var (
	serverOnce sync.Once
	serverURL  string
	serverErr  error

	mainMu     sync.Mutex
	mainCalled bool
	stoppers   []func()
)

// Main runs the tests of m and then stops whatever server this package
// started (an ephemeral cluster or a container), and exits with the tests'
// exit code. Call it from TestMain.
func Main(m interface{ Run() int }) {
	mainMu.Lock()
	mainCalled = true
	mainMu.Unlock()
	code := m.Run()
	Stop()
	os.Exit(code)
}

// Stop stops and removes whatever server this package started. Main calls
// it; call it yourself from a TestMain that does not use Main.
func Stop() {
	mainMu.Lock()
	s := stoppers
	stoppers = nil
	mainMu.Unlock()
	for i := len(s) - 1; i >= 0; i-- {
		s[i]()
	}
}

func registerStop(f func()) {
	mainMu.Lock()
	stoppers = append(stoppers, f)
	mainMu.Unlock()
}

// ServerURL returns the connection string of the server databases are made
// on, finding or starting it on first use. It fails t when there is none.
func ServerURL(t testing.TB) string {
	t.Helper()
	u, err := server()
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func server() (string, error) {
	serverOnce.Do(func() { serverURL, serverErr = findServer() })
	return serverURL, serverErr
}

// NewDatabaseURL creates a fresh, empty database for t and returns its
// connection string. The database is dropped (WITH (FORCE)) when t ends.
// Safe to call from parallel tests.
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
	admin, err := server()
	if err != nil {
		return "", nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "jobwatchtest_" + hex.EncodeToString(b[:])
	u, err := withDatabase(admin, name)
	if err != nil {
		return "", nil, fmt.Errorf("jobwatchtest: %w", err)
	}
	if err := adminExec(ctx, admin, "CREATE DATABASE "+name+" TEMPLATE template0"); err != nil {
		return "", nil, fmt.Errorf("jobwatchtest: create database: %w", err)
	}
	drop = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := adminExec(ctx, admin, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			return fmt.Errorf("jobwatchtest: drop database %s: %w", name, err)
		}
		return nil
	}
	return u, drop, nil
}

func adminExec(ctx context.Context, admin, sql string) error {
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", redact(admin), err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
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
// defaults). A setting already present is replaced. Never append "&key=value"
// to a connection string yourself: that breaks the DSN and query-less forms.
//
//	url := jobwatchtest.NewDatabaseURL(t)
//	url, err := jobwatchtest.WithParam(url, "application_name", "my_test")
func WithParam(connString, key, value string) (string, error) {
	if key == "" {
		return "", errors.New("jobwatchtest: WithParam: empty key")
	}
	if isURL(connString) {
		u, err := url.Parse(connString)
		if err != nil {
			return "", fmt.Errorf("jobwatchtest: WithParam: parse %s: %w", redact(connString), err)
		}
		q := u.Query()
		q.Set(key, value)
		// pgx does not read "+" as a space: encode spaces as %20.
		u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
		return u.String(), nil
	}
	// pgx reads the last of repeated keys; quoting keeps spaces and quotes.
	quoted := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(value)
	return strings.TrimSpace(connString + " " + key + "='" + quoted + "'"), nil
}

func isURL(connString string) bool {
	return strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://")
}

// withDatabase returns connString pointing at database name.
func withDatabase(connString, name string) (string, error) {
	if isURL(connString) {
		u, err := url.Parse(connString)
		if err != nil {
			return "", fmt.Errorf("parse %s: %w", redact(connString), err)
		}
		u.Path = "/" + name
		return u.String(), nil
	}
	return strings.TrimSpace(connString + " dbname=" + name), nil
}

// redact hides a password in a URL for messages.
func redact(connString string) string {
	if u, err := url.Parse(connString); err == nil && u.User != nil {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
			return u.String()
		}
	}
	return connString
}

// findServer tries each source in turn and returns the first that works,
// or one error that says what was tried.
func findServer() (string, error) {
	only := os.Getenv(SourceEnvVar)
	switch only {
	case "", "url", "default", "ephemeral", "container":
	default:
		return "", fmt.Errorf("jobwatchtest: %s=%q: want url, default, ephemeral or container", SourceEnvVar, only)
	}
	use := func(source string) bool { return only == "" || only == source }
	if u, ok := os.LookupEnv(EnvVar); ok && u != "" && use("url") {
		if err := ping(u); err != nil {
			return "", fmt.Errorf("jobwatchtest: %s=%s does not answer: %v", EnvVar, redact(u), err)
		}
		return u, nil
	}
	var tried []string
	if use("default") {
		err := ping("")
		if err == nil {
			return "", nil
		}
		tried = append(tried, fmt.Sprintf("a server at pgx's defaults (PG* variables, local socket, localhost:5432): %v", err))
	}
	if use("ephemeral") {
		u, err := startEphemeral()
		if err == nil {
			return u, nil
		}
		tried = append(tried, "an ephemeral cluster from local PostgreSQL binaries: "+err.Error())
	}
	if use("container") {
		u, err := startContainer()
		if err == nil {
			return u, nil
		}
		tried = append(tried, "a testcontainers-go PostgreSQL container: "+err.Error())
	}
	if only == "url" {
		tried = append(tried, EnvVar+" is not set")
	}
	return "", errors.New("jobwatchtest: no PostgreSQL server for the tests. Tried:\n  - " +
		strings.Join(tried, "\n  - ") +
		"\nFix: set " + EnvVar + " (for example postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable), " +
		"start a local server, install PostgreSQL (apt-get install postgresql), or start a Docker engine.")
}

func ping(connString string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return err
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	// The admin connection must be able to create databases.
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return errors.New("the role cannot create databases")
	}
	return nil
}
