// Package pgtest finds or starts the PostgreSQL servers the tests of this
// repository run against: the server for their databases (from
// TEST_DATABASE_URL, pgx's defaults or an ephemeral cluster), scratch
// clusters with streaming standbys for failover tests, and PgBouncer. The
// public package jobwatchtest is built on it; jobwatch's own tests use it
// directly, so that the library's module does not depend on
// testcontainers.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvVar names the variable that points the tests at a server.
const EnvVar = "TEST_DATABASE_URL"

// SourceEnvVar, when set, names the one source to use: "url" (EnvVar),
// "default" (pgx's defaults), "ephemeral" or "container". The tests then
// fail rather than fall back to another, which proves a source works.
const SourceEnvVar = "JOBWATCHTEST_SOURCE"

// Container, when set (jobwatchtest.UseContainer sets it), starts a
// PostgreSQL server and returns its connection string; it is the last
// source tried.
var Container func() (string, error)

var (
	serverOnce sync.Once
	serverURL  string
	serverErr  error

	mainMu     sync.Mutex
	mainCalled bool
	stoppers   []func()
)

// Main runs the tests of m, then stops whatever this package started, and
// exits with the tests' exit code. Call it from TestMain.
func Main(m interface{ Run() int }) {
	mainMu.Lock()
	mainCalled = true
	mainMu.Unlock()
	code := m.Run()
	Stop()
	os.Exit(code)
}

// Stop stops and removes whatever server this package started for the
// whole process.
func Stop() {
	mainMu.Lock()
	s := stoppers
	stoppers = nil
	mainMu.Unlock()
	for i := len(s) - 1; i >= 0; i-- {
		s[i]()
	}
}

// RegisterStop adds f to what Stop runs.
func RegisterStop(f func()) {
	mainMu.Lock()
	stoppers = append(stoppers, f)
	mainMu.Unlock()
}

func withMain() bool {
	mainMu.Lock()
	defer mainMu.Unlock()
	return mainCalled
}

// ServerURL returns the connection string of the server databases are made
// on, finding or starting it on first use.
func ServerURL() (string, error) {
	serverOnce.Do(func() { serverURL, serverErr = findServer() })
	return serverURL, serverErr
}

// CreateDatabase creates a fresh, empty database and returns its
// connection string and a function that drops it (WITH (FORCE)).
func CreateDatabase(ctx context.Context) (connString string, drop func() error, err error) {
	admin, err := ServerURL()
	if err != nil {
		return "", nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "jobwatchtest_" + hex.EncodeToString(b[:])
	u, err := WithDatabase(admin, name)
	if err != nil {
		return "", nil, err
	}
	if err := execSQL(ctx, admin, "CREATE DATABASE "+name+" TEMPLATE template0"); err != nil {
		return "", nil, fmt.Errorf("create database: %w", err)
	}
	drop = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := execSQL(ctx, admin, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			return fmt.Errorf("drop database %s: %w", name, err)
		}
		return nil
	}
	return u, drop, nil
}

func execSQL(ctx context.Context, connString, sql string) error {
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", Redact(connString), err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// WithParam returns connString with one more setting, key=value: a pgx or
// pgxpool setting (pool_max_conns), a libpq one (sslmode) or a server
// run-time parameter (application_name). It works on every form a
// connection string can take here: a postgres:// URL with or without a
// query string, a key=value DSN, and the empty string (pgx's defaults). A
// setting already present is replaced.
func WithParam(connString, key, value string) (string, error) {
	if key == "" {
		return "", errors.New("WithParam: empty key")
	}
	if isURL(connString) {
		u, err := url.Parse(connString)
		if err != nil {
			return "", fmt.Errorf("WithParam: parse %s: %w", Redact(connString), err)
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

// WithDatabase returns connString pointing at database name.
func WithDatabase(connString, name string) (string, error) {
	if isURL(connString) {
		u, err := url.Parse(connString)
		if err != nil {
			return "", fmt.Errorf("parse %s: %w", Redact(connString), err)
		}
		u.Path = "/" + name
		return u.String(), nil
	}
	return WithParam(connString, "dbname", name)
}

// Redact hides a password in a connection string, a URL or a key=value
// DSN, for messages.
func Redact(connString string) string {
	if !isURL(connString) {
		return dsnPassword.ReplaceAllString(connString, "${1}xxxxx")
	}
	if u, err := url.Parse(connString); err == nil {
		if u.User != nil {
			if _, ok := u.User.Password(); ok {
				u.User = url.UserPassword(u.User.Username(), "xxxxx")
			}
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return connString
}

// dsnPassword matches a password setting of a key=value DSN, quoted or not.
var dsnPassword = regexp.MustCompile(`(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// findServer tries each source in turn and returns the first that works,
// or one error that says what was tried.
func findServer() (string, error) {
	only := os.Getenv(SourceEnvVar)
	switch only {
	case "", "url", "default", "ephemeral", "container":
	default:
		return "", fmt.Errorf("%s=%q: want url, default, ephemeral or container", SourceEnvVar, only)
	}
	use := func(source string) bool { return only == "" || only == source }
	if u, ok := os.LookupEnv(EnvVar); ok && u != "" && use("url") {
		if err := ping(u); err != nil {
			return "", fmt.Errorf("%s=%s does not answer: %v", EnvVar, Redact(u), err)
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
		if Container == nil {
			tried = append(tried, "a PostgreSQL container: import github.com/jobwatch-go/jobwatch/jobwatchtest/container to start one")
		} else if u, err := Container(); err == nil {
			return u, nil
		} else {
			tried = append(tried, "a testcontainers-go PostgreSQL container: "+err.Error())
		}
	}
	if only == "url" {
		tried = append(tried, EnvVar+" is not set")
	}
	return "", errors.New("no PostgreSQL server for the tests. Tried:\n  - " +
		strings.Join(tried, "\n  - ") +
		"\nFix: set " + EnvVar + " (for example postgres://postgres@127.0.0.1:5432/postgres), " +
		"start a local server, install PostgreSQL (apt-get install postgresql), or start a Docker engine.")
}

// ping checks that connString reaches a server whose role can create
// databases.
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
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return errors.New("the role cannot create databases")
	}
	return nil
}
