package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	osexec "os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The migration tools, at the versions the tests run: the real commands,
// built from the Go module proxy once per test run.
const (
	gooseModule   = "github.com/pressly/goose/v3/cmd/goose@v3.30.1"
	migrateModule = "github.com/golang-migrate/migrate/v4/cmd/migrate@v4.20.1"
)

var (
	toolsOnce sync.Once
	toolsDir  string
	toolsErr  error
)

// tool returns the path of a migration tool's binary, building both once.
func tool(t *testing.T, name string) string {
	t.Helper()
	toolsOnce.Do(func() {
		toolsDir, toolsErr = os.MkdirTemp("", "jobwatch-tools")
		if toolsErr != nil {
			return
		}
		for _, c := range [][]string{{gooseModule}, {"-tags", "postgres", migrateModule}} {
			cmd := osexec.Command("go", append([]string{"install"}, c...)...)
			cmd.Env = append(os.Environ(), "GOBIN="+toolsDir, "GOFLAGS=-mod=mod")
			if out, err := cmd.CombinedOutput(); err != nil {
				toolsErr = fmt.Errorf("go install %s: %v: %s", strings.Join(c, " "), err, out)
				return
			}
		}
	})
	require.NoError(t, toolsErr, "the tests run the real migration tools, built from the Go module proxy")
	return filepath.Join(toolsDir, name)
}

// connStrings returns the test database as a key=value DSN (goose) and as
// a postgres:// URL (golang-migrate), both spelled out in full.
func connStrings(t *testing.T, dbURL string) (dsn, u string) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dbURL)
	require.NoError(t, err)
	dsn = fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", cfg.Host, cfg.Port, cfg.User, cfg.Database)
	q := url.Values{"sslmode": {"disable"}}
	host := fmt.Sprintf("%s:%d", cfg.Host, cfg.Port)
	if strings.HasPrefix(cfg.Host, "/") {
		q.Set("host", cfg.Host)
		q.Set("port", fmt.Sprint(cfg.Port))
		host = ""
	}
	user := url.User(cfg.User)
	if cfg.Password != "" {
		dsn += " password='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(cfg.Password) + "'"
		user = url.UserPassword(cfg.User, cfg.Password)
	}
	return dsn, (&url.URL{Scheme: "postgres", User: user, Host: host, Path: "/" + cfg.Database, RawQuery: q.Encode()}).String()
}

func healthy(t *testing.T, dbURL string) bool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), dbURL)
	require.NoError(t, err)
	defer pool.Close()
	ok, err := jobwatch.NotificationTriggersHealthy(context.Background(), pool, "jobs")
	require.NoError(t, err)
	return ok
}

// TestMigrationTools: the goose file and the golang-migrate pair that
// jobwatch sql prints go up and down under the real tools.
func TestMigrationTools(t *testing.T) {
	t.Parallel()
	t.Run("goose", func(t *testing.T) {
		t.Parallel()
		dbURL, pool := database(t)
		exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
		dir := t.TempDir()
		file, _, code := jobwatchCmd("sql", "-format", "goose", "jobs")
		require.Equal(t, exitOK, code)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "00042_jobwatch.sql"), []byte(file), 0o644))
		dsn, _ := connStrings(t, dbURL)
		goose := func(args ...string) {
			t.Helper()
			out, err := osexec.Command(tool(t, "goose"), append([]string{"-dir", dir, "postgres", dsn}, args...)...).CombinedOutput()
			require.NoError(t, err, "goose %s: %s", strings.Join(args, " "), out)
		}
		goose("up")
		assert.True(t, healthy(t, dbURL), "up installs")
		goose("down")
		assert.False(t, healthy(t, dbURL), "down removes")
		goose("up")
		assert.True(t, healthy(t, dbURL))
	})
	t.Run("golang-migrate", func(t *testing.T) {
		t.Parallel()
		dbURL, pool := database(t)
		exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
		dir := t.TempDir()
		up, _, code := jobwatchCmd("sql", "-format", "migrate", "jobs")
		require.Equal(t, exitOK, code)
		down, _, code := jobwatchCmd("sql", "-format", "migrate", "-down", "jobs")
		require.Equal(t, exitOK, code)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "42_jobwatch.up.sql"), []byte(up), 0o644))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "42_jobwatch.down.sql"), []byte(down), 0o644))
		_, u := connStrings(t, dbURL)
		migrate := func(args ...string) {
			t.Helper()
			out, err := osexec.Command(tool(t, "migrate"), append([]string{"-path", dir, "-database", u}, args...)...).CombinedOutput()
			require.NoError(t, err, "migrate %s: %s", strings.Join(args, " "), out)
		}
		migrate("up")
		assert.True(t, healthy(t, dbURL), "up installs")
		migrate("down", "-all")
		assert.False(t, healthy(t, dbURL), "down removes")
		var left int
		require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_proc
			WHERE proname IN ('jobwatch_notify_jobs', 'jobwatch_notify_rows_jobs', 'notify_job_queued_jobs')`).Scan(&left))
		assert.Zero(t, left, "no function left, IHP's included (the up script created it)")
	})
	_, stderr, code := jobwatchCmd("sql", "-format", "goose", "-down", "jobs")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "leave out -down")
	_, stderr, code = jobwatchCmd("sql", "-format", "atlas", "jobs")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "want plain, migrate or goose")
}

// failingWriter fails every write, as /dev/full or a closed pipe does.
type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// TestOutputNotWritten: a command whose output cannot be written says so
// and fails, instead of exiting 0 having printed nothing.
func TestOutputNotWritten(t *testing.T) {
	t.Parallel()
	var stderr syncBuffer
	code := run(context.Background(), []string{"sql", "jobs"}, failingWriter{}, &stderr)
	assert.Equal(t, exitError, code)
	assert.Contains(t, stderr.String(), "jobwatch sql: write the output: no space left on device")

	if runtime.GOOS != "linux" {
		return // /dev/full is Linux's
	}
	f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	require.NoError(t, err)
	defer f.Close()
	var full syncBuffer
	assert.Equal(t, exitError, run(context.Background(), []string{"version"}, f, &full), "/dev/full")
	assert.Contains(t, full.String(), "no space left on device")
}

func TestVersion(t *testing.T) {
	t.Parallel()
	stdout, _, code := jobwatchCmd("version")
	require.Equal(t, exitOK, code)
	assert.Regexp(t, `^jobwatch \S.* go1\.\d+`, stdout)
}

// TestDoctorScripted: the exit codes a script branches on, and the JSON
// document; a -timeout too short is "not checked", never a pooler's fault.
func TestDoctorScripted(t *testing.T) {
	t.Parallel()
	dbURL, pool := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))

	stdout, _, code := jobwatchCmd("doctor", "-json", "-url", dbURL, "jobs")
	assert.Equal(t, exitFail, code, "triggers missing")
	var r doctorReport
	require.NoError(t, json.Unmarshal([]byte(stdout), &r), stdout)
	assert.Equal(t, exitFail, r.ExitCode)
	assert.Len(t, r.Findings, 8)
	statuses := map[string]string{}
	for _, f := range r.Findings {
		statuses[f.Check] = f.Status
	}
	assert.Equal(t, "FAIL", statuses["triggers"])
	assert.Equal(t, "OK", statuses["delivery"])

	exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
	exec(t, pool, "DROP INDEX jobwatch_pending_jobs")
	_, _, code = jobwatchCmd("doctor", "-url", dbURL, "jobs")
	assert.Equal(t, exitWarn, code, "a missing index only warns")

	stdout, stderr, code := jobwatchCmd("doctor", "-timeout", "1ms", "-url", dbURL, "jobs")
	assert.Equal(t, exitNoCheck, code)
	assert.Contains(t, stderr, "-timeout 1ms passed before every check ran")
	assert.NotContains(t, stdout+stderr, "transaction mode")
}
