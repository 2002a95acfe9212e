package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { pgtest.Main(removeTools{m}) }

// removeTools removes the migration tools the tests built (see tool) once
// they have run.
type removeTools struct{ *testing.M }

func (r removeTools) Run() int {
	code := r.M.Run()
	if toolsDir != "" {
		_ = os.RemoveAll(toolsDir)
	}
	return code
}

// database creates a fresh database for t.
func database(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	url, drop, err := pgtest.CreateDatabase(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, drop()) })
	pool, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return url, pool
}

func exec(t *testing.T, pool *pgxpool.Pool, sql string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), sql)
	require.NoError(t, err, sql)
}

// syncBuffer is a bytes.Buffer safe for the writers of tail.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// jobwatchCmd runs the command in this process.
func jobwatchCmd(args ...string) (stdout, stderr string, code int) {
	var o, e syncBuffer
	code = run(context.Background(), args, &o, &e)
	return o.String(), e.String(), code
}

func TestUsage(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		args []string
		code int
		out  string // in stdout, or stderr for a usage error
	}{
		{nil, exitUsage, "Usage:"},
		{[]string{"-h"}, exitOK, "jobwatch doctor TABLE"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"sql", "-h"}, exitOK, "Usage: jobwatch sql TABLE"},
		{[]string{"doctor", "-h"}, exitOK, "-listener-url"},
		{[]string{"tail", "-h"}, exitOK, "Usage: jobwatch tail TABLE"},
		{[]string{"sql"}, exitUsage, "want one TABLE argument, got 0"},
		{[]string{"doctor", "a", "b"}, exitUsage, "want one TABLE argument, got 2"},
		{[]string{"sql", "-bogus", "jobs"}, exitUsage, "flag provided but not defined: -bogus"},
		{[]string{"sql", "jobs; DROP TABLE x"}, exitUsage, `jobwatch sql: invalid table name "jobs; DROP TABLE x"`},
		{[]string{"tail", `"unterminated`}, exitUsage, "jobwatch tail: invalid table name"},
	} {
		stdout, stderr, code := jobwatchCmd(c.args...)
		assert.Equal(t, c.code, code, "%v", c.args)
		assert.Contains(t, stdout+stderr, c.out, "%v", c.args)
		assert.NotContains(t, stderr, "jobwatch: jobwatch", "%v", c.args)
		assert.NotContains(t, stderr, "goroutine ", "no stack trace")
	}
}

// TestSQLCommand: the printed script is the library's, works in psql's
// place, and -down removes what it installed.
func TestSQLCommand(t *testing.T) {
	t.Parallel()
	_, pool := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
	up, _, code := jobwatchCmd("sql", "jobs")
	require.Equal(t, exitOK, code)
	assert.Equal(t, jobwatch.CreateNotificationTriggerSQL("jobs")+";\n", up)
	exec(t, pool, up)
	healthy, err := jobwatch.NotificationTriggersHealthy(context.Background(), pool, "jobs")
	require.NoError(t, err)
	require.True(t, healthy)

	ungated, _, code := jobwatchCmd("sql", "-gate=false", "jobs")
	require.Equal(t, exitOK, code)
	assert.Equal(t, jobwatch.CreateNotificationTriggerSQLWith("jobs", jobwatch.WithNotifyGate(false))+";\n", ungated)
	assert.NotEqual(t, up, ungated)

	down, _, code := jobwatchCmd("sql", "jobs", "-down")
	require.Equal(t, exitOK, code)
	exec(t, pool, down)
	healthy, err = jobwatch.NotificationTriggersHealthy(context.Background(), pool, "jobs")
	require.NoError(t, err)
	assert.False(t, healthy)
	var left int
	require.NoError(t, pool.QueryRow(context.Background(), "SELECT count(*) FROM pg_proc WHERE proname LIKE 'jobwatch%'").Scan(&left))
	assert.Zero(t, left, "no function of jobwatch's left")
	exec(t, pool, down) // idempotent
}

// doctorLines runs the doctor and returns its output by check.
func doctorLines(t *testing.T, args ...string) (map[string]string, int) {
	t.Helper()
	stdout, stderr, code := jobwatchCmd(append([]string{"doctor"}, args...)...)
	if code != exitNoCheck {
		require.Empty(t, stderr)
	}
	lines := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(stdout), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == "OK" || f[0] == "WARN" || f[0] == "FAIL") {
			check := f[1]
			if check == "notify" {
				check = "notify queue"
			}
			lines[check] = line
		}
	}
	t.Logf("jobwatch doctor %s:\n%s", strings.Join(args, " "), stdout)
	return lines, code
}

func statusOf(lines map[string]string, check string) string {
	return strings.Fields(lines[check])[0]
}

func TestDoctor(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		setup func(t *testing.T, pool *pgxpool.Pool) // after the job table
		want  map[string]string                      // check: status; the others must be OK
		says  string
	}{
		{name: "healthy", setup: func(t *testing.T, pool *pgxpool.Pool) {
			exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
		}},
		{name: "triggers missing", want: map[string]string{"triggers": "FAIL"}, says: "notify nobody"},
		{name: "trigger function of another version", setup: func(t *testing.T, pool *pgxpool.Pool) {
			exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
			exec(t, pool, `CREATE OR REPLACE FUNCTION jobwatch_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS
				$$ BEGIN PERFORM pg_notify('job_available_jobs', ''); RETURN NULL; END $$`)
		}, want: map[string]string{"triggers": "WARN"}, says: "another jobwatch version"},
		{name: "no index", setup: func(t *testing.T, pool *pgxpool.Pool) {
			exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
			exec(t, pool, `DROP INDEX jobwatch_pending_jobs`)
		}, want: map[string]string{"index": "WARN"}, says: "CREATE INDEX IF NOT EXISTS"},
		{name: "a job waiting long", setup: func(t *testing.T, pool *pgxpool.Pool) {
			exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
			exec(t, pool, `INSERT INTO jobs (run_at) VALUES (now() - interval '5 minutes'), (now() + interval '1 hour')`)
		}, want: map[string]string{"jobs": "WARN"}, says: "1 due now, 1 scheduled for later"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			url, pool := database(t)
			exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
			if c.setup != nil {
				c.setup(t, pool)
			}
			lines, code := doctorLines(t, "-url", url, "jobs")
			assert.Len(t, lines, 8, "one line per check")
			for check, line := range lines {
				want := "OK"
				if w, ok := c.want[check]; ok {
					want = w
				}
				assert.Equal(t, want, statusOf(lines, check), line)
			}
			switch {
			case len(c.want) == 0:
				assert.Equal(t, exitOK, code)
			case slices.Contains(slices.Collect(maps.Values(c.want)), "FAIL"):
				assert.Equal(t, exitFail, code)
			default:
				assert.Equal(t, exitWarn, code, "warnings only")
			}
			if len(c.want) > 0 {
				stdout, _, _ := jobwatchCmd("doctor", "-url", url, "jobs")
				assert.Contains(t, stdout, c.says)
			}
		})
	}
}

// TestDoctorFailures: what the doctor finds when the table, the server or
// the Listener's path is wrong.
func TestDoctorFailures(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	otherURL, _ := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
	exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))

	lines, code := doctorLines(t, "-url", url, "no_such_table")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "table"))
	assert.Contains(t, lines["table"], "no_such_table does not exist")

	lines, code = doctorLines(t, "-url", url, "-listener-url", otherURL, "jobs")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "delivery"))
	assert.Contains(t, lines["delivery"], "different databases")

	port, err := pgtest.FreePort()
	require.NoError(t, err)
	nowhere := "postgres://postgres@127.0.0.1:" + strconv.Itoa(port) + "/x?connect_timeout=2"
	lines, code = doctorLines(t, "-url", nowhere, "jobs")
	assert.Equal(t, exitNoCheck, code, "could not check")
	assert.Equal(t, "FAIL", statusOf(lines, "server"))
	assert.Contains(t, lines["server"], "connection refused")

	_, stderr, code := jobwatchCmd("tail", "-url", nowhere, "jobs")
	assert.Equal(t, exitError, code)
	assert.True(t, strings.HasPrefix(stderr, "jobwatch tail: "), stderr)
	assert.Contains(t, stderr, "connection refused")
	assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %s", stderr)

	_, stderr, code = jobwatchCmd("tail", "-url", url, "no_such_table")
	assert.Equal(t, exitError, code)
	assert.Contains(t, stderr, "table does not exist")
}

// TestDoctorThroughTransactionPooler: a Listener's connection string
// through PgBouncer in transaction mode fails the delivery check.
func TestDoctorThroughTransactionPooler(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
	exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
	b, err := pgtest.StartPgBouncer(url)
	require.NoError(t, err)
	defer b.Stop()
	lines, code := doctorLines(t, "-url", url, "-listener-url", b.URL(pgtest.TransactionMode), "jobs")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "delivery"))
	assert.Contains(t, lines["delivery"], "transaction mode")

	lines, code = doctorLines(t, "-url", url, "-listener-url", b.URL(pgtest.SessionMode), "jobs")
	assert.Equal(t, exitOK, code, "session mode works")
	assert.Equal(t, "OK", statusOf(lines, "delivery"))
}

// TestDoctorWorkerRole: a role that may not install the triggers is fine
// while they are installed, and a failure when they are not.
func TestDoctorWorkerRole(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
	var b [4]byte
	_, _ = rand.Read(b[:])
	role := "jobwatch_doctor_" + hex.EncodeToString(b[:]) // roles are the server's: a name of its own
	exec(t, pool, "CREATE ROLE "+role+" LOGIN")
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "DROP OWNED BY "+role+"; DROP ROLE "+role)
	})
	exec(t, pool, "GRANT SELECT, UPDATE ON jobs TO "+role)
	workerURL, err := pgtest.WithParam(url, "user", role)
	require.NoError(t, err)

	lines, code := doctorLines(t, "-url", workerURL, "jobs")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "privileges"))
	assert.Equal(t, "FAIL", statusOf(lines, "triggers"))

	exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
	lines, code = doctorLines(t, "-url", workerURL, "jobs")
	assert.Equal(t, exitOK, code)
	assert.Contains(t, lines["privileges"], "need not")
}

// TestTailCommand: tail prints each notification with what it announces,
// until its context ends.
func TestTailCommand(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, jobwatch.CreateJobTableSQL("jobs"))
	exec(t, pool, jobwatch.CreateNotificationTriggerSQL("jobs"))
	ctx, cancel := context.WithCancel(context.Background())
	var out, errOut syncBuffer
	done := make(chan int)
	go func() { done <- run(ctx, []string{"tail", "-url", url, "jobs"}, &out, &errOut) }()
	waitFor := func(pattern string) {
		t.Helper()
		re := regexp.MustCompile(pattern)
		deadline := time.Now().Add(15 * time.Second)
		for !re.MatchString(out.String()) {
			require.True(t, time.Now().Before(deadline), "no %q in:\n%s\n%s", pattern, out.String(), errOut.String())
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("listening on job_available_jobs")
	exec(t, pool, "INSERT INTO jobs DEFAULT VALUES")
	waitFor(`"x:[0-9]+ g:" +1 job due \(gated\)`)
	exec(t, pool, "INSERT INTO jobs SELECT FROM generate_series(1, 3)")
	waitFor(`"x:[0-9]+ g:due:3" +3 jobs due \(gated\)`)
	exec(t, pool, "INSERT INTO jobs (run_at) VALUES (now() + interval '1 hour')")
	waitFor("next job due at ")
	cancel()
	assert.Equal(t, exitOK, <-done)
	assert.Empty(t, errOut.String())
}

// gueTable is a gue-like job table: done jobs are deleted, each has a due
// time and a queue.
const gueTable = `CREATE TABLE gue_jobs (job_id text PRIMARY KEY, run_at timestamptz NOT NULL, queue text NOT NULL DEFAULT '')`

// gueDescription is its description, as flags and as a JobTable.
var (
	gueFlags = []string{"-run-at", "run_at", "-queue", "queue"}
	gueJobs  = jobwatch.JobTable{RunAt: "run_at", Queue: "queue"}
)

// TestJobTableUsage: the description flags' bad arguments, found without a
// server.
func TestJobTableUsage(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		args []string
		out  string // in stderr
	}{
		{[]string{"sql", "-pending", "a; DROP TABLE x", "jobs"}, "jobwatch sql: invalid job table description: "},
		{[]string{"sql", "-pending", "a = 'b", "jobs"}, "unterminated ' quote"},
		{[]string{"sql", "-run-at-zone", "UTC", "jobs"}, "RunAtTimeZone without a RunAt column"},
		{[]string{"doctor", "-url", "postgres://127.0.0.1:1/x", "-run-at", "run_at", "-pending", "true -- x", "jobs"}, "comments are not accepted"},
		{[]string{"tail", "-run-at", "run_at", "-queues", "a,b", "jobs"}, "jobwatch tail: -queues needs -queue"},
		{[]string{"tail", "-queues", "a", "jobs"}, "-queues needs -queue"},
		{[]string{"tail", "-pending", "(a", "jobs"}, "unbalanced parentheses"},
		{[]string{"tail", "-queue", "queue", "-queues", "a\xff", "jobs"}, "WithQueues"},
	} {
		stdout, stderr, code := jobwatchCmd(c.args...)
		assert.Equal(t, exitUsage, code, "%q", c.args)
		assert.Empty(t, stdout, "%q", c.args)
		assert.Contains(t, stderr, c.out, "%q", c.args)
		assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %s", stderr)
		assert.NotContains(t, stderr, "poll jobs", "%q: the check's own words", c.args)
	}
	for _, cmd := range []string{"sql", "doctor", "tail"} {
		_, help, code := jobwatchCmd(cmd, "-h")
		assert.Equal(t, exitOK, code)
		for _, f := range []string{"-pending", "-run-at", "-run-at-zone", "-queue", "jobwatch.IHPJobTable"} {
			assert.Contains(t, help, f, "%s -h", cmd)
		}
		assert.Equal(t, cmd == "tail", strings.Contains(help, "-queues"), "%s -h", cmd)
	}
}

// TestSQLCommandJobTable: with a description, sql prints
// CreateNotificationTriggerSQLFor's script, which installs working
// triggers; with none of the flags, IHP's (TestSQLCommand).
func TestSQLCommandJobTable(t *testing.T) {
	t.Parallel()
	_, pool := database(t)
	exec(t, pool, gueTable)
	up, stderr, code := jobwatchCmd(append(append([]string{"sql"}, gueFlags...), "gue_jobs")...)
	require.Equal(t, exitOK, code, stderr)
	assert.Equal(t, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", gueJobs)+";\n", up)
	assert.NotEqual(t, jobwatch.CreateNotificationTriggerSQL("gue_jobs")+";\n", up)
	exec(t, pool, up)
	healthy, err := jobwatch.NotificationTriggersHealthy(context.Background(), pool, "gue_jobs")
	require.NoError(t, err)
	assert.True(t, healthy)

	// Every field, and -gate, reach the script.
	args := []string{"sql", "-gate=false", "-pending", "queue <> ''", "-run-at", "run_at", "-run-at-zone", "UTC", "-queue", "queue", "gue_jobs"}
	all, _, code := jobwatchCmd(args...)
	require.Equal(t, exitOK, code)
	assert.Equal(t, jobwatch.CreateNotificationTriggerSQLWith("gue_jobs", jobwatch.WithNotifyGate(false),
		jobwatch.WithJobTable(jobwatch.JobTable{Pending: "queue <> ''", RunAt: "run_at", RunAtTimeZone: "UTC", Queue: "queue"}))+";\n", all)

	// A flag given empty is a description: every row pending, due at once.
	empty, _, code := jobwatchCmd("sql", "-pending", "", "gue_jobs")
	require.Equal(t, exitOK, code)
	assert.Equal(t, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", jobwatch.JobTable{})+";\n", empty)

	goose, _, code := jobwatchCmd(append(append([]string{"sql", "-format", "goose"}, gueFlags...), "gue_jobs")...)
	require.Equal(t, exitOK, code)
	assert.Contains(t, goose, up)
}

// TestDoctorJobTable: the doctor reads the description against the table
// and checks the triggers were made for it.
func TestDoctorJobTable(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, gueTable)
	exec(t, pool, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", gueJobs))

	args := append([]string{"-url", url}, gueFlags...)
	lines, code := doctorLines(t, append(args, "gue_jobs")...)
	assert.Equal(t, exitOK, code)
	assert.Len(t, lines, 8, "one line per check")
	assert.Contains(t, lines["table"], `described as {`)
	assert.Contains(t, lines["table"], `"queue"`)
	for check, line := range lines {
		assert.Equal(t, "OK", statusOf(lines, check), line)
	}

	// IHP's description, the default, is not this table's.
	lines, code = doctorLines(t, "-url", url, "gue_jobs")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "table"))

	// Another description: the triggers were not made for it.
	lines, code = doctorLines(t, append(args, "-pending", "queue = 'x'", "gue_jobs")...)
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "OK", statusOf(lines, "table"))
	assert.Equal(t, "FAIL", statusOf(lines, "triggers"))
	assert.Contains(t, lines["triggers"], "made for another job table description")

	// One the server refuses against the table fails the table check.
	lines, code = doctorLines(t, append(args, "-pending", "now() > run_at", "gue_jobs")...)
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "table"))
	assert.Contains(t, lines["table"], "cannot be watched")
	lines, code = doctorLines(t, "-url", url, "-run-at", "no_such_column", "gue_jobs")
	assert.Equal(t, exitFail, code)
	assert.Equal(t, "FAIL", statusOf(lines, "table"))

	// One refused before the server reads it is a bad argument.
	_, stderr, code := jobwatchCmd(append([]string{"doctor"}, append(args, "-pending", "true; SELECT 1", "gue_jobs")...)...)
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, stderr, "invalid job table description")

	// -json names the description in the table finding too.
	stdout, _, code := jobwatchCmd(append([]string{"doctor", "-json"}, append(args, "gue_jobs")...)...)
	assert.Equal(t, exitOK, code)
	assert.Contains(t, stdout, `described as {`)
}

// TestTailCommandQueues: tail with a description prints the queue of each
// notification, and with -queues only its queues' (and those that name
// none).
func TestTailCommandQueues(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, gueTable)
	exec(t, pool, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", gueJobs))
	ctx, cancel := context.WithCancel(context.Background())
	var out, errOut syncBuffer
	done := make(chan int)
	args := append(append([]string{"tail", "-url", url}, gueFlags...), "-queues", "emails,", "gue_jobs")
	go func() { done <- run(ctx, args, &out, &errOut) }()
	waitFor := func(what string) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for !strings.Contains(out.String(), what) {
			require.True(t, time.Now().Before(deadline), "no %q in:\n%s\n%s", what, out.String(), errOut.String())
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor(`listening on job_available_gue_jobs for queue(s) ["emails" ""]`)
	exec(t, pool, `INSERT INTO gue_jobs VALUES ('1', now(), 'reports')`)
	exec(t, pool, `INSERT INTO gue_jobs VALUES ('2', now(), 'emails')`)
	waitFor(`1 job due in queue "emails" (gated)`)
	exec(t, pool, `INSERT INTO gue_jobs VALUES ('3', now(), '')`)
	waitFor(`1 job due in queue "" (gated)`)
	exec(t, pool, `INSERT INTO gue_jobs VALUES ('4', now() + interval '1 hour', 'emails')`)
	waitFor(`in queue "emails" (gated)`)
	waitFor("next job due at ")
	cancel()
	assert.Equal(t, exitOK, <-done)
	assert.Empty(t, errOut.String())
	assert.NotContains(t, out.String(), "reports", "another queue's job")
	t.Logf("jobwatch tail:\n%s", out.String())
}

// TestTailCommandJobTable: tail with a description prints every queue's
// notifications, and has the server read the description first.
func TestTailCommandJobTable(t *testing.T) {
	t.Parallel()
	url, pool := database(t)
	exec(t, pool, gueTable)
	args := append([]string{"tail", "-url", url}, gueFlags...)

	// Refused by the server: an error, before listening.
	_, stderr, code := jobwatchCmd(append(args, "-pending", "now() > run_at", "gue_jobs")...)
	assert.Equal(t, exitError, code)
	assert.True(t, strings.HasPrefix(stderr, "jobwatch tail: the job table description cannot be watched"), stderr)
	assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %s", stderr)
	_, stderr, code = jobwatchCmd(append(args, "no_such_table")...)
	assert.Equal(t, exitError, code)
	assert.Contains(t, stderr, "no_such_table does not exist")

	// Triggers made for IHP's table's description: said, then listened.
	exec(t, pool, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", jobwatch.JobTable{RunAt: "run_at"}))
	ctx, cancel := context.WithCancel(context.Background())
	var out, errOut syncBuffer
	done := make(chan int)
	go func() { done <- run(ctx, append(args, "gue_jobs"), &out, &errOut) }()
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(out.String(), "listening on job_available_gue_jobs (Ctrl-C to stop)") {
		require.True(t, time.Now().Before(deadline), "not listening:\n%s\n%s", out.String(), errOut.String())
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	assert.Equal(t, exitOK, <-done)
	assert.Contains(t, errOut.String(), "made for another job table description")
	assert.Equal(t, 1, strings.Count(errOut.String(), "\n"), "one line: %s", errOut.String())

	// With this description's triggers, every queue is shown.
	exec(t, pool, jobwatch.CreateNotificationTriggerSQLFor("gue_jobs", gueJobs))
	ctx, cancel = context.WithCancel(context.Background())
	out, errOut = syncBuffer{}, syncBuffer{}
	go func() { done <- run(ctx, append(args, "gue_jobs"), &out, &errOut) }()
	deadline = time.Now().Add(15 * time.Second)
	for !strings.Contains(out.String(), "listening on") {
		require.True(t, time.Now().Before(deadline), "not listening:\n%s\n%s", out.String(), errOut.String())
		time.Sleep(5 * time.Millisecond)
	}
	exec(t, pool, `INSERT INTO gue_jobs VALUES ('1', now(), 'reports'), ('2', now(), 'reports')`)
	for !strings.Contains(out.String(), `2 jobs due in queue "reports"`) {
		require.True(t, time.Now().Before(deadline), "no notification:\n%s\n%s", out.String(), errOut.String())
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	assert.Equal(t, exitOK, <-done)
	assert.Empty(t, errOut.String())
}
