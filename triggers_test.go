package jobwatch_test

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChannelNames(t *testing.T) {
	t.Parallel()
	cases := map[string]string{
		"jobs":                  "job_available_jobs",
		"Jobs":                  "job_available_jobs",
		`"MixedJobs"`:           "job_available_MixedJobs",
		"app.jobs":              "job_available_app.jobs",
		`"App"."Jobs"`:          "job_available_App.Jobs",
		"schedule_jobs_for_you": "job_available_schedule_jobs_for_you",
	}
	for in, want := range cases {
		assert.Equal(t, want, jobwatch.ChannelName(in), in)
	}
}

func TestLongNamesFitAndDiffer(t *testing.T) {
	t.Parallel()
	a := strings.Repeat("x", 55) + "_alpha"
	b := strings.Repeat("x", 55) + "_bravo"
	ca, cb := jobwatch.ChannelName(a), jobwatch.ChannelName(b)
	assert.LessOrEqual(t, len(ca), 63)
	assert.LessOrEqual(t, len(cb), 63)
	assert.NotEqual(t, ca, cb, "long names sharing a prefix get different channels")
	assert.Equal(t, ca, jobwatch.ChannelName(a), "deterministic")
	// 49 bytes is the longest table name whose IHP names all fit.
	n49 := strings.Repeat("y", 49)
	assert.Equal(t, "job_available_"+n49, jobwatch.ChannelName(n49))
	// Multi-byte names are cut on a character boundary.
	u := strings.Repeat("é", 40)
	assert.LessOrEqual(t, len(jobwatch.ChannelName(u)), 63)
	assert.True(t, strings.ToValidUTF8(jobwatch.ChannelName(u), "?") == jobwatch.ChannelName(u))
}

// TestNamesInTheDatabase installs and uses triggers on long, qualified,
// quoted and hostile table names: every INSERT works, every derived name
// fits, two long names sharing a prefix get their own triggers, and no name
// injects SQL.
func TestNamesInTheDatabase(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.exec(t, "CREATE SCHEMA app; CREATE TABLE victim (id int)")
	long := strings.Repeat("l", 56)
	tables := []string{
		"jobs",
		"app.jobs",
		"public.jobs",
		`"MixedJobs"`,
		long + "_one",
		long + "_two",
		`"evil'); DROP TABLE victim; --"`,
		`"dollar$$quote$jobwatch$$jobwatch_fn$"`,
		`"back\slash"`,
		`app."with ""quotes"" and.dot"`,
	}
	l := testListener(t, d.url, opt)
	ctx := ctxT(t)
	type watched struct {
		table string
		w     *jobwatch.Watch
		ch    chan jobwatch.Message
	}
	var ws []watched
	for _, table := range tables {
		d.jobTable(t, table)
		ch := make(chan jobwatch.Message, 10)
		w, err := jobwatch.WatchForJob(ctx, d.pool, l, table, time.Hour, ch, opt)
		require.NoError(t, err, table)
		t.Cleanup(func() { _ = w.Close() })
		settle(t, w, ch)
		require.True(t, triggersHealthy(t, d.pool, table), table)
		ws = append(ws, watched{table, w, ch})
	}
	require.NotContains(t, lg.String(), "level=ERROR")

	for i, x := range ws {
		d.exec(t, "INSERT INTO "+x.table+" DEFAULT VALUES") // each name is valid SQL as written
		waitWake(t, x.ch, x.table)
		for _, y := range ws {
			// jobs and public.jobs are one table, with two sets of triggers.
			want := uint64(0)
			for k := 0; k <= i; k++ {
				if physical(ws[k].table) == physical(y.table) {
					want++
				}
			}
			eventually(t, fmt.Sprintf("after inserting into %s, %d notifications for %s", x.table, want, y.table),
				func() bool { return y.w.Stats().Notifications == want })
		}
	}
	var victim bool
	require.NoError(t, d.pool.QueryRow(ctx, "SELECT to_regclass('victim') IS NOT NULL").Scan(&victim))
	assert.True(t, victim, "no table name injected SQL")

	var longest int
	require.NoError(t, d.pool.QueryRow(ctx, `SELECT max(length(tgname::text)) FROM pg_trigger WHERE NOT tgisinternal`).Scan(&longest))
	assert.LessOrEqual(t, longest, 63)
	var triggers int
	require.NoError(t, d.pool.QueryRow(ctx, `SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal`).Scan(&triggers))
	assert.Equal(t, 2*len(tables), triggers)
}

func physical(table string) string { return strings.TrimPrefix(table, "public.") }

func TestScriptNeverDropsHealthyTrigger(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	oids := func() string {
		var s string
		require.NoError(t, d.pool.QueryRow(ctx, `SELECT string_agg(oid::text, ',' ORDER BY oid) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass`).Scan(&s))
		return s
	}
	before := oids()
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs"))
	assert.Equal(t, before, oids())
}

// TestInstallWhilePgDumpRuns: pg_dump holds ACCESS SHARE on every table it
// dumps; installing the triggers must neither fail nor wait for it.
func TestInstallWhilePgDumpRuns(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)
	dump := beginWith(t, d, "LOCK TABLE jobs IN ACCESS SHARE MODE")
	defer dump.Rollback(ctx)
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt))
	assert.True(t, triggersHealthy(t, d.pool, "jobs"))
}

// TestInstallWithWriterLockHeld: a long writer holds ROW EXCLUSIVE. The
// installer must give up at once (ErrTriggersBusy) instead of queueing,
// because a queued ACCESS EXCLUSIVE-class request would make every later
// INSERT queue behind it. Once the writer commits, installation succeeds.
func TestInstallWithWriterLockHeld(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)
	writer := beginWith(t, d, "INSERT INTO jobs DEFAULT VALUES")
	err := jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt)
	require.ErrorIs(t, err, jobwatch.ErrTriggersBusy)

	// Later writers are not blocked by a pending installer lock.
	conn, err := d.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, "SET statement_timeout = '5s'")
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "RESET statement_timeout")
	require.NoError(t, err)

	require.NoError(t, writer.Commit(ctx))
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt))
}

// TestInstallerWaitsForAnother: while another installer (here: IHP's
// advisory lock key, held by a transaction) works, the migration script
// waits for it instead of failing, and succeeds once it ends: a migration
// must not fail because a worker tries to install at the same moment (as a
// worker role without DDL rights does on its backoff). One held for longer
// than a second makes an installer give up with ErrTriggersBusy.
func TestInstallerWaitsForAnother(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)

	other := beginWith(t, d, "SELECT pg_advisory_xact_lock(hashtext(current_schema()), hashtext('notify_job_queued_jobs'::name::text))")
	err := jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt)
	require.ErrorIs(t, err, jobwatch.ErrTriggersBusy, "held past the wait")

	conn, err := d.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	pid := conn.Conn().PgConn().PID()
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, jobwatch.CreateNotificationTriggerSQL("jobs"))
		done <- err
	}()
	eventually(t, "the migration waits on the installation lock", func() bool {
		var waiting bool
		require.NoError(t, d.pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'advisory')", pid).Scan(&waiting))
		return waiting
	})
	require.NoError(t, other.Rollback(ctx))
	require.NoError(t, <-done, "the migration succeeds once the other installer is done")
	assert.True(t, triggersHealthy(t, d.pool, "jobs"))
}

// TestInstallKeepsCallersLockTimeout: a migration tool may run the script
// inside its own transaction; the script's short lock_timeout must not
// outlive it.
func TestInstallKeepsCallersLockTimeout(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.jobTable(t, "jobs")
	tx := beginWith(t, d, "SET LOCAL lock_timeout = '7s'")
	_, err := tx.Exec(ctxT(t), jobwatch.CreateNotificationTriggerSQL("jobs"))
	require.NoError(t, err)
	var timeout string
	require.NoError(t, tx.QueryRow(ctxT(t), "SHOW lock_timeout").Scan(&timeout))
	assert.Equal(t, "7s", timeout)
	require.NoError(t, tx.Commit(ctxT(t)))
}

// TestConcurrentInstallers: many installers at once (Go's and the migration
// script) all succeed, never meeting "tuple concurrently updated", and
// leave the triggers healthy.
func TestConcurrentInstallers(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.jobTable(t, "jobs")
	ctx := ctxT(t)
	for round := range 3 {
		d.exec(t, "DROP TRIGGER IF EXISTS did_insert_job_jobs ON jobs; DROP TRIGGER IF EXISTS did_update_job_jobs ON jobs")
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if i%2 == 0 {
					errs <- jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt)
					return
				}
				_, err := d.pool.Exec(ctx, jobwatch.CreateNotificationTriggerSQL("jobs"))
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			assert.NoError(t, err, "round %d: each waits for the one installing, then finds the work done", round)
		}
		require.NoError(t, jobwatch.EnsureNotificationTriggers(ctx, d.pool, "jobs", opt))
		assert.True(t, triggersHealthy(t, d.pool, "jobs"))
	}
}

// beginWith opens a transaction on its own connection, runs sql in it and
// leaves it open; it is rolled back when the test ends.
func beginWith(t *testing.T, d db, sql string) pgx.Tx {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, d.url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, sql)
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	return tx
}

func FuzzDerivedNames(f *testing.F) {
	for _, s := range []string{"jobs", "app.jobs", `"MixedJobs"`, strings.Repeat("a", 70), `"a""b"`, "é.ü", `"x$$y"`, "", ".", `"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		c := jobwatch.ChannelName(name)
		if len(c) > 63 || c == "" {
			t.Fatalf("ChannelName(%q) = %q (%d bytes)", name, c, len(c))
		}
		if c != jobwatch.ChannelName(name) {
			t.Fatal("not deterministic")
		}
	})
}

// FuzzTriggerSQL checks that no table name can close the script's dollar
// quotes early: the outer tag occurs exactly twice, and each tag that opens
// a function body (stmt_body text := $tag$...) occurs twice per body.
func FuzzTriggerSQL(f *testing.F) {
	for _, s := range []string{"jobs", `"a$jobwatch$b"`, `"$jobwatch_fn$"`, `"$jobwatch0$$jobwatch$"`, `x.";DROP"`, `"it's"`, `"back\slash"`} {
		f.Add(s)
	}
	bodyTag := regexp.MustCompile(`_body pg_catalog.text := (\$[a-z_0-9]*\$)`)
	f.Fuzz(func(t *testing.T, name string) {
		sql := jobwatch.CreateNotificationTriggerSQL(name)
		if !strings.HasPrefix(sql, "DO $") {
			t.Fatalf("not a DO block: %q", sql)
		}
		tag := sql[3 : strings.IndexByte(sql[4:], '$')+5]
		if n := strings.Count(sql, tag); n != 2 {
			t.Fatalf("outer tag %s occurs %d times in %q", tag, n, sql)
		}
		uses := map[string]int{}
		for _, m := range bodyTag.FindAllStringSubmatch(sql, -1) {
			uses[m[1]]++
		}
		for inner, k := range uses {
			if n := strings.Count(sql, inner); n != 2*k {
				t.Fatalf("body tag %s opens %d bodies but occurs %d times in %q", inner, k, n, sql)
			}
		}
	})
}

// TestTriggerSQLBodies: a valid name's script carries its three function
// bodies, so that FuzzTriggerSQL's check of their tags runs.
func TestTriggerSQLBodies(t *testing.T) {
	t.Parallel()
	sql := jobwatch.CreateNotificationTriggerSQL(`"$jobwatch_fn$"`)
	assert.Equal(t, 3, strings.Count(sql, "_body pg_catalog.text := $jobwatch_fn0$"), sql)
}

func TestQuoteTableName(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"jobs":         `"jobs"`,
		"App.Jobs":     `"app"."jobs"`,
		`"MixedJobs"`:  `"MixedJobs"`,
		`app."a""b.c"`: `"app"."a""b.c"`,
		` jobs `:       `"jobs"`,
		`"x"."y"`:      `"x"."y"`,
	} {
		got, err := jobwatch.QuoteTableName(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "a.b.c", `"unterminated`, "jobs; DROP TABLE x", `""`, "a..b", "1jobs", "a.", `"a"b`} {
		_, err := jobwatch.QuoteTableName(bad)
		assert.ErrorIs(t, err, jobwatch.ErrInvalidTableName, bad)
	}
}

// TestIHPRefreshCausesNoLoop: an IHP worker starting up re-creates
// notify_job_queued_<table> with its per-row body. jobwatch's statement
// triggers do not call it, so an UPDATE that leaves no job pending (such as
// a fetch, or one matching no row) still sends nothing.
func TestIHPRefreshCausesNoLoop(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	// IHP's script, as its worker runs it at start (its triggers exist under
	// the same names, so it only replaces the function).
	d.exec(t, `CREATE OR REPLACE FUNCTION notify_job_queued_jobs() RETURNS TRIGGER AS $$
BEGIN PERFORM pg_notify('job_available_jobs', ''); RETURN new; END; $$ language plpgsql`)
	d.exec(t, "UPDATE jobs SET status = 'job_status_running' WHERE false")
	d.exec(t, "INSERT INTO jobs (status) VALUES ('job_status_succeeded')")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "pending insert")
	assert.EqualValues(t, 1, w.Stats().Notifications, "only the pending insert notified")
}
