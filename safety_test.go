package jobwatch_test

import (
	"context"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A shared database: other roles connect, may hold any advisory lock,
// NOTIFY any channel and create objects in schemas open to them;
// producers have search paths of their own. Nothing of that may stall an
// INSERT, make a job go unwoken, or run another role's code inside a
// trigger.

// connectAs opens a connection as role, closed when the test ends.
func connectAs(t *testing.T, d db, role string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctxT(t), d.with(t, "user", role))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// poolAs opens a pool as role (the test's own user for ""), with settings
// (key=value) given to every connection.
func poolAs(t *testing.T, d db, role string, settings ...string) *pgxpool.Pool {
	t.Helper()
	url := d.url
	if role != "" {
		url = d.with(t, "user", role)
	}
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	for _, s := range settings {
		k, v, _ := strings.Cut(s, "=")
		cfg.ConnConfig.RuntimeParams[k] = v
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// gateKeys reads the notify gate's advisory lock keys of table the way
// any connected role can: from the trigger function's source.
func gateKeys(t *testing.T, conn *pgx.Conn, function string) (notify, skip int64) {
	t.Helper()
	var src string
	require.NoError(t, conn.QueryRow(ctxT(t), "SELECT prosrc FROM pg_proc WHERE proname = $1", function).Scan(&src))
	m := regexp.MustCompile(`pg_try_advisory_xact_lock\((-?\d+)\)[\s\S]*pg_try_advisory_xact_lock_shared\((-?\d+)\)`).FindStringSubmatch(src)
	require.NotNil(t, m, "the keys are in the function's source")
	notify, err := strconv.ParseInt(m[1], 10, 64)
	require.NoError(t, err)
	skip, err = strconv.ParseInt(m[2], 10, 64)
	require.NoError(t, err)
	return notify, skip
}

// consume fetches every due job of table each time ch wakes it, until
// want jobs were fetched, and fails the test if they are not within
// waitLimit.
func consume(t *testing.T, pool *pgxpool.Pool, ch <-chan jobwatch.Message, table string, want int) {
	t.Helper()
	fetched := 0
	deadline := time.After(waitLimit)
	for fetched < want {
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("%d of %d jobs fetched: the others were not woken", fetched, want)
		}
		var n int
		require.NoError(t, pool.QueryRow(ctxT(t), `WITH f AS (UPDATE `+table+` SET status = 'job_status_succeeded'
			WHERE status = 'job_status_not_started' AND run_at <= now() RETURNING 1) SELECT count(*) FROM f`).Scan(&n))
		fetched += n
	}
}

// produce runs producers goroutines, each inserting each jobs in
// transactions of their own, every statement under a 2s
// statement_timeout. It returns when all committed (the errors are the
// test's), and when the last one did.
func produce(t *testing.T, pool *pgxpool.Pool, table string, producers, each int) time.Time {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var last time.Time
	for range producers {
		wg.Go(func() {
			for range each {
				_, err := pool.Exec(context.Background(), "SET statement_timeout = '2s'; INSERT INTO "+table+" DEFAULT VALUES")
				if err != nil {
					t.Errorf("INSERT: %v", err)
					return
				}
				mu.Lock()
				last = time.Now()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return last
}

// TestGateKeysHeldByAnotherRole: a role with no right on the table reads
// the gate's keys from pg_proc and holds them. No INSERT waits on them
// (8 producers, every statement under a 2s statement_timeout), and every
// job is woken with the poll interval at an hour: holding the notify key
// costs latency (the skips are found by the counter's check), holding the
// skip key makes the producers notify themselves.
func TestGateKeysHeldByAnotherRole(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name         string
		notify, skip bool // which keys the other role holds
	}{
		{"notify key", true, false},
		{"skip key", false, true},
		{"both keys", true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			_, ch, _ := startWatch(t, d, "jobs", time.Hour, 100, opt)
			other := connectAs(t, d, role(t, d))
			notifyKey, skipKey := gateKeys(t, other, "jobwatch_notify_jobs")
			if c.notify {
				_, err := other.Exec(ctxT(t), "SELECT pg_advisory_lock($1)", notifyKey)
				require.NoError(t, err)
			}
			if c.skip {
				_, err := other.Exec(ctxT(t), "SELECT pg_advisory_lock($1)", skipKey)
				require.NoError(t, err)
			}
			const producers, each = 8, 25
			last := make(chan time.Time, 1)
			go func() { last <- produce(t, d.pool, "jobs", producers, each) }()
			consume(t, d.pool, ch, "jobs", producers*each)
			late := time.Since(<-last)
			t.Logf("%s held: %d jobs from %d producers, none waited; the last woken and fetched within %v of the last commit",
				c.name, producers*each, producers, late.Round(time.Millisecond))
		})
	}
}

// TestPlantedOperatorNeverRuns: public is writable by every role (as
// databases upgraded from PostgreSQL 14 and older keep it), and another
// role plants operators there that match the triggers' expressions more
// closely than pg_catalog's. A superuser's inserts, of jobs due now, due
// in a batch and due later, in and out of the gate, never run them.
func TestPlantedOperatorNeverRuns(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, "GRANT CREATE ON SCHEMA public TO PUBLIC")
	other := connectAs(t, d, role(t, d))
	_, err := other.Exec(ctxT(t), `
		CREATE TABLE public.stolen (who text, what text);
		GRANT INSERT ON public.stolen TO PUBLIC;
		CREATE FUNCTION public.steal_int_text(integer, text) RETURNS text LANGUAGE plpgsql AS
			$$ BEGIN INSERT INTO public.stolen VALUES (current_user, 'integer || text'); RETURN $1::text || $2; END $$;
		CREATE OPERATOR public.|| (LEFTARG = integer, RIGHTARG = text, FUNCTION = public.steal_int_text);
		CREATE FUNCTION public.steal_text_numeric(text, numeric) RETURNS text LANGUAGE plpgsql AS
			$$ BEGIN INSERT INTO public.stolen VALUES (current_user, 'text || numeric'); RETURN $1 || $2::text; END $$;
		CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = numeric, FUNCTION = public.steal_text_numeric);
`)
	require.NoError(t, err)

	_, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	tx, _ := holder(t, d) // some inserts skip behind it
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, tx.Commit(ctxT(t)))
	inTx(t, d, func(tx pgx.Tx) {
		mustExec(t, tx, "INSERT INTO jobs DEFAULT VALUES")
		mustExec(t, tx, "INSERT INTO jobs (run_at) SELECT now() + interval '1 hour' FROM generate_series(1, 3)")
		mustExec(t, tx, "INSERT INTO jobs SELECT FROM generate_series(1, 3)")
		mustExec(t, tx, "UPDATE jobs SET status = 'job_status_retry' WHERE run_at > now()")
	})
	waitWake(t, ch, "the jobs")
	var stolen []string
	rows, err := d.pool.Query(ctxT(t), "SELECT who || ': ' || what FROM public.stolen")
	require.NoError(t, err)
	stolen, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Empty(t, stolen, "another role's operators ran inside the triggers")
}

// TestProducerSearchPathDoesNotMatter: producers whose search_path is
// empty, holds only another tenant's schema, or misses the table's schema
// (which they name in full) skip their NOTIFY behind the gate's holder;
// their jobs are woken all the same, as are those of a table the watch
// finds on its own search_path.
func TestProducerSearchPathDoesNotMatter(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, schema, watchPath, producerPath string
	}{
		{"empty path", "public", "", ""},
		{"another tenant's path", "public", "", "tenant"},
		{"table's schema off the path", "app", "app", "public"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			d.exec(t, "CREATE SCHEMA tenant; CREATE SCHEMA app")
			table := c.schema + ".jobs"
			d.jobTable(t, table)
			pool := d.pool
			if c.watchPath != "" {
				pool = poolAs(t, d, "", "search_path="+c.watchPath)
			}
			// The watch names the table as its own path finds it.
			_, ch, _ := d.watch(t, opt, watchSetup{pool: pool, noTable: true})
			producer := poolAs(t, d, "", "search_path="+c.producerPath)
			o := observe(t, d, "jobs")
			beginWith(t, d, "INSERT INTO "+table+" DEFAULT VALUES") // holds the notify key until the test ends
			got := o.during(t, func() {
				for range 3 {
					_, err := producer.Exec(ctxT(t), "INSERT INTO "+table+" DEFAULT VALUES")
					require.NoError(t, err)
				}
			})
			require.Empty(t, got, "the producers skipped behind the holder")
			consume(t, d.pool, ch, table, 3)
		})
	}
}

// TestInstallAsOwnerWithOwnSchema: the table's owner has a schema of its
// own first on its search_path ("$user"); everything is created in the
// table's schema, and works.
func TestInstallAsOwnerWithOwnSchema(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	owner := role(t, d)
	d.jobTable(t, "jobs")
	d.exec(t, "CREATE SCHEMA AUTHORIZATION "+owner+"; GRANT CREATE ON SCHEMA public TO "+owner+"; ALTER TABLE jobs OWNER TO "+owner)
	pool := poolAs(t, d, owner)
	var path string
	require.NoError(t, pool.QueryRow(ctxT(t), "SELECT current_schema()").Scan(&path))
	require.Equal(t, owner, path, "the owner's own schema comes first")
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), pool, "jobs", opt))
	assert.True(t, triggersHealthy(t, pool, "jobs"))
	var misplaced int
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace::regnamespace::text = $1)
		+ (SELECT count(*) FROM pg_class WHERE relnamespace::regnamespace::text = $1)`, owner).Scan(&misplaced))
	assert.Zero(t, misplaced, "nothing in the owner's own schema")
	_, ch, _ := d.watch(t, opt, watchSetup{pool: pool, noTable: true})
	_, err := pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
	require.NoError(t, err)
	waitWake(t, ch, "owner's insert")
}

// TestInstallForAnotherOwner: the migration runs as a superuser, or as a
// member of the owning role, on a table the application's role owns. It
// installs, hands what it created to the table's owner, and that role's
// own worker can later repair the triggers.
func TestInstallForAnotherOwner(t *testing.T) {
	t.Parallel()
	for _, asMember := range []bool{false, true} {
		name := "superuser"
		if asMember {
			name = "member of the owning role"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			app := role(t, d)
			d.jobTable(t, "jobs")
			d.exec(t, "GRANT CREATE ON SCHEMA public TO "+app+"; ALTER TABLE jobs OWNER TO "+app)
			migrator := d.pool
			if asMember {
				m := role(t, d)
				d.exec(t, "GRANT "+app+" TO "+m+"; GRANT CREATE ON SCHEMA public TO "+m)
				migrator = poolAs(t, d, m)
			}
			findings, err := jobwatch.Diagnose(ctxT(t), migrator, d.url, "jobs")
			require.NoError(t, err)
			assert.Equal(t, jobwatch.StatusOK, finding(findings, "privileges").Status, "Diagnose: this role can install")
			_, err = migrator.Exec(ctxT(t), jobwatch.CreateNotificationTriggerSQL("jobs"))
			require.NoError(t, err)
			assert.True(t, triggersHealthy(t, d.pool, "jobs"))
			var owners []string
			rows, err := d.pool.Query(ctxT(t), `SELECT DISTINCT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname LIKE '%jobs'
				UNION SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'jobwatch_skips_jobs'`)
			require.NoError(t, err)
			owners, err = pgx.CollectRows(rows, pgx.RowTo[string])
			require.NoError(t, err)
			assert.Equal(t, []string{app}, owners, "everything belongs to the table's owner")

			d.exec(t, "DROP TRIGGER did_update_job_jobs ON jobs")
			require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), poolAs(t, d, app), "jobs", opt), "the owner's worker repairs")
			assert.True(t, triggersHealthy(t, d.pool, "jobs"))
		})
	}
}

func finding(fs []jobwatch.Finding, check string) jobwatch.Finding {
	for _, f := range fs {
		if f.Check == check {
			return f
		}
	}
	return jobwatch.Finding{Check: check, Status: jobwatch.StatusFail, Detail: "no such check"}
}

// TestDisabledTriggersAreUnhealthy: a bulk load that disabled the
// triggers and was not undone, or triggers enabled for replicas only,
// notify nobody. They are unhealthy, the doctor fails them, repair
// enables them again, and a role that may not says once why.
func TestDisabledTriggersAreUnhealthy(t *testing.T) {
	t.Parallel()
	for _, disable := range []string{
		"ALTER TABLE jobs DISABLE TRIGGER USER",
		"ALTER TABLE jobs ENABLE REPLICA TRIGGER did_insert_job_jobs",
		"ALTER TABLE jobs_1 DISABLE TRIGGER jobwatch_update_jobs",
	} {
		t.Run(disable, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			_, opt := newLogs(t)
			d.jobTable(t, "jobs")
			if strings.Contains(disable, "jobs_1") {
				d.exec(t, `DROP TABLE jobs; CREATE TABLE jobs (id bigserial, status text NOT NULL DEFAULT 'job_status_not_started',
					run_at timestamptz NOT NULL DEFAULT now(), locked_by uuid) PARTITION BY RANGE (id);
					CREATE TABLE jobs_1 PARTITION OF jobs FOR VALUES FROM (MINVALUE) TO (MAXVALUE)`)
			}
			require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "jobs", opt))
			require.True(t, triggersHealthy(t, d.pool, "jobs"))
			d.exec(t, disable)
			assert.False(t, triggersHealthy(t, d.pool, "jobs"), "disabled triggers notify nobody")
			findings, err := jobwatch.Diagnose(ctxT(t), d.pool, d.url, "jobs")
			require.NoError(t, err)
			assert.Equal(t, jobwatch.StatusFail, finding(findings, "triggers").Status, finding(findings, "triggers").Detail)

			// A worker that may not repair says so once.
			worker := role(t, d)
			d.exec(t, "GRANT SELECT, INSERT, UPDATE ON jobs TO "+worker)
			err = jobwatch.EnsureNotificationTriggers(ctxT(t), poolAs(t, d, worker), "jobs", opt)
			require.ErrorIs(t, err, jobwatch.ErrPermissionDenied)

			// A watch with repair enables them and says what it found.
			lg, opt := newLogs(t)
			_, ch, _ := d.watch(t, opt, watchSetup{noTable: true})
			assert.True(t, triggersHealthy(t, d.pool, "jobs"))
			assert.Equal(t, 1, lg.lines("disabled"), "one line says what was repaired")
			drain(ch)
			o := observe(t, d, "jobs")
			assert.NotEmpty(t, o.sent(t, "INSERT INTO jobs DEFAULT VALUES", "UPDATE jobs SET status = 'job_status_retry'"), "notifies again")
		})
	}
}

// TestInfiniteRunAt: 'infinity' and '-infinity' are valid timestamps. A
// job at -infinity is due; one at infinity never is; neither breaks a
// poll, the triggers or the doctor.
func TestInfiniteRunAt(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	w, ch, _ := d.watch(t, opt, watchSetup{interval: 50 * time.Millisecond, opts: []jobwatch.Option{jobwatch.WithJitter(0)}})
	d.exec(t, "INSERT INTO jobs (run_at) VALUES ('infinity'), ('-infinity')")
	waitWake(t, ch, "the job due since -infinity")
	d.exec(t, "INSERT INTO jobs (run_at) VALUES ('infinity')")
	polls := w.Stats().Polls
	eventually(t, "polls go on", func() bool { return w.Stats().Polls > polls+3 })
	assert.Zero(t, w.Stats().PollErrors, lg.String())
	assert.NotContains(t, lg.String(), "level=ERROR")
	findings, err := jobwatch.Diagnose(ctxT(t), d.pool, d.url, "jobs")
	require.NoError(t, err)
	assert.NotEqual(t, jobwatch.StatusFail, finding(findings, "jobs").Status, finding(findings, "jobs").Detail)
}

// TestDistinctTablesDistinctNames: "a.b".c and a."b.c" are two tables;
// each watch hears its own table only.
func TestDistinctTablesDistinctNames(t *testing.T) {
	t.Parallel()
	assert.NotEqual(t, jobwatch.ChannelName(`"a.b".c`), jobwatch.ChannelName(`a."b.c"`))
	assert.NotEqual(t, jobwatch.ChannelName(`"a.b"`), jobwatch.ChannelName(`a.b`))
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, `CREATE SCHEMA "a.b"; CREATE SCHEMA a`)
	l := testListener(t, d.url, opt)
	w1, ch1, _ := d.watch(t, opt, watchSetup{table: `"a.b".c`, listener: l})
	w2, ch2, _ := d.watch(t, opt, watchSetup{table: `a."b.c"`, listener: l})
	d.exec(t, `INSERT INTO "a.b".c DEFAULT VALUES`)
	waitWake(t, ch1, `"a.b".c`)
	d.exec(t, `INSERT INTO a."b.c" DEFAULT VALUES`)
	waitWake(t, ch2, `a."b.c"`)
	eventually(t, "one notification each", func() bool {
		return w1.Stats().Notifications == 1 && w2.Stats().Notifications == 1
	})
	assert.Zero(t, drain(ch1)+drain(ch2), "nobody heard the other table")
}

// TestRevokedCounterGrant: an administrator revokes the skip counter's
// grants from PUBLIC. Producers without the right notify instead of
// failing; a watch that cannot read the counter keeps polling without
// error, says once that it cannot follow the gate, and polls at the
// fallback interval so that a skipped job still wakes within a second.
func TestRevokedCounterGrant(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.jobTable(t, "jobs")
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "jobs", opt))
	worker := role(t, d)
	d.exec(t, "GRANT SELECT, INSERT, UPDATE ON jobs TO "+worker)
	d.exec(t, "REVOKE ALL ON SEQUENCE jobwatch_skips_jobs FROM PUBLIC")
	pool := poolAs(t, d, worker)
	w, ch, _ := d.watch(t, opt, watchSetup{pool: pool, noTable: true})

	// A producer without the right, behind a holder: it notifies.
	tx := beginWith(t, d, "INSERT INTO jobs DEFAULT VALUES")
	o := observe(t, d, "jobs")
	got := o.during(t, func() {
		_, err := pool.Exec(ctxT(t), "INSERT INTO jobs DEFAULT VALUES")
		require.NoError(t, err, "an INSERT never fails for the counter's grants")
	})
	assert.NotEmpty(t, got, "it notified instead of skipping")
	waitWake(t, ch, "its job")
	require.NoError(t, tx.Rollback(ctxT(t)))

	// A producer with the right (the owner) skips behind a holder; the
	// watch, which cannot read the counter, still finds the job.
	tx = beginWith(t, d, "INSERT INTO jobs DEFAULT VALUES")
	drain(ch)
	committed := skipped(t, d, o)
	wokenAfter(t, ch, committed, "skipped job, counter unreadable")
	require.NoError(t, tx.Rollback(ctxT(t)))
	assert.Zero(t, w.Stats().PollErrors, lg.String())
	assert.Equal(t, 1, lg.count("cannot read the notify gate's skip counter"), lg.String())
	assert.Zero(t, lg.count("polling works again"), "no poll failed")

	// Granted again: said once, by the Listener's next look at the gate.
	d.exec(t, "GRANT SELECT, USAGE ON SEQUENCE jobwatch_skips_jobs TO "+worker)
	eventually(t, "the grant seen", func() bool { return lg.count("skip counter can be read again") == 1 })
}

// TestNameTakenByAnotherRole: in a schema every role may write to,
// another role creates the skip counter and the trigger function before
// jobwatch does. The install refuses to use them and says which to drop;
// inserts go on working meanwhile.
func TestNameTakenByAnotherRole(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.exec(t, "GRANT CREATE ON SCHEMA public TO PUBLIC")
	d.jobTable(t, "jobs")
	other := connectAs(t, d, role(t, d))
	_, err := other.Exec(ctxT(t), `CREATE SEQUENCE public.jobwatch_skips_jobs;
		CREATE FUNCTION public.jobwatch_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$`)
	require.NoError(t, err)
	err = jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "jobs", opt)
	require.ErrorIs(t, err, jobwatch.ErrNameTaken)
	assert.Contains(t, err.Error(), "jobwatch_skips_jobs")
	assert.Contains(t, err.Error(), "jobwatch_notify_jobs")
	_, err = d.pool.Exec(ctxT(t), jobwatch.CreateNotificationTriggerSQL("jobs"))
	var pgErr *pgconn.PgError
	require.True(t, errors.As(err, &pgErr), "the migration fails too: %v", err)
	assert.Contains(t, pgErr.Message, "drop it")

	w, _, _ := d.watch(t, opt, watchSetup{noTable: true})
	assert.ErrorIs(t, w.Stats().LastError, jobwatch.ErrNameTaken)
	assert.Equal(t, 1, lg.count("level=ERROR"), "one line")
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	findings, err := jobwatch.Diagnose(ctxT(t), d.pool, d.url, "jobs")
	require.NoError(t, err)
	assert.Equal(t, jobwatch.StatusFail, finding(findings, "triggers").Status)
}

// TestJunkNotifications: any role may NOTIFY any channel. Payloads a
// trigger never sends (huge counts and times, infinities, 8000 bytes of
// noise) wake a watch at most as the channel has room for and break
// nothing.
func TestJunkNotifications(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt)
	other := connectAs(t, d, role(t, d))
	for _, p := range []string{"due:99999999999999999999999", "due:-5", "at:1e300", "at:-1e300", "at:Infinity", "at:NaN",
		"in:1e300", "in:Infinity", "g:g:g:poll", "g:", strings.Repeat("x", 7999)} {
		_, err := other.Exec(ctxT(t), "SELECT pg_notify($1, $2)", jobwatch.ChannelName("jobs"), p)
		require.NoError(t, err)
	}
	eventually(t, "all received", func() bool { return w.Stats().Notifications == 11 })
	for _, p := range []string{"at:1e300", "at:Infinity", "at:NaN", "in:1e300", "in:Infinity"} {
		assert.Equal(t, jobwatch.Payload{Due: 1}, jobwatch.ParsePayload(p), "%s: no trigger sends it: one due job", p)
	}
	assert.LessOrEqual(t, drain(ch), 10)
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	waitWake(t, ch, "a real job after the junk")
	assert.NotContains(t, lg.String(), "level=ERROR")
}
