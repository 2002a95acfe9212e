package jobwatch_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// observer is a plain LISTEN connection on a table's channel, to see the
// exact notifications statements send.
type observer struct {
	d       db
	conn    *pgx.Conn
	channel string
}

// markerChannel carries the observer's markers: not the table's channel,
// so that no watch sees them.
const markerChannel = "jobwatch_test_marker"

func observe(t *testing.T, d db, table string) *observer {
	t.Helper()
	ctx := ctxT(t)
	conn, err := pgx.Connect(ctx, d.url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	ch := jobwatch.ChannelName(table)
	_, err = conn.Exec(ctx, "LISTEN "+pgx.Identifier{ch}.Sanitize()+"; LISTEN "+markerChannel)
	require.NoError(t, err)
	return &observer{d: d, conn: conn, channel: ch}
}

// during runs do, then sends a marker notification, and returns the
// payloads that arrived on the table's channel before the marker: one
// connection receives notifications in commit order, so these are exactly
// what do's transactions sent.
func (o *observer) during(t *testing.T, do func()) []string {
	t.Helper()
	do()
	o.d.exec(t, "NOTIFY "+markerChannel)
	var got []string
	for {
		n, err := o.conn.WaitForNotification(ctxT(t))
		require.NoError(t, err)
		if n.Channel == markerChannel {
			return got
		}
		got = append(got, withoutKey(t, n.Payload))
	}
}

// withoutKey checks that payload starts with its transaction's id, as
// every statement trigger's does, and returns the rest; a partition's row
// trigger sends "poll" alone.
func withoutKey(t *testing.T, payload string) string {
	t.Helper()
	if payload == "poll" {
		return payload
	}
	require.Regexp(t, `^x:[1-9][0-9]* `, payload)
	_, rest, _ := strings.Cut(payload, " ")
	return rest
}

// sent returns what the statements sent, each in its own transaction.
func (o *observer) sent(t *testing.T, stmts ...string) []string {
	t.Helper()
	return o.during(t, func() {
		for _, s := range stmts {
			o.d.exec(t, s)
		}
	})
}

// inTx runs stmts in one transaction.
func inTx(t *testing.T, d db, stmts func(tx pgx.Tx)) {
	t.Helper()
	ctx := ctxT(t)
	tx, err := d.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	stmts(tx)
	require.NoError(t, tx.Commit(ctx))
}

func mustExec(t *testing.T, tx pgx.Tx, sql string, args ...any) {
	t.Helper()
	_, err := tx.Exec(ctxT(t), sql, args...)
	require.NoError(t, err)
}

// partitionState returns, for each partition of jobs, whether it has
// jobwatch's statement triggers and whether its clone of the row trigger
// still fires.
func partitionState(t *testing.T, d db, table string) map[string]string {
	t.Helper()
	rows, err := d.pool.Query(ctxT(t), `SELECT p.relid::regclass::text,
		count(*) FILTER (WHERE tg.tgname LIKE 'jobwatch\_insert\_%' OR tg.tgname LIKE 'jobwatch\_update\_%'),
		coalesce(bool_or(tg.tgname LIKE 'jobwatch\_rows\_%' AND tg.tgenabled <> 'D'), false)
		FROM pg_partition_tree($1) p LEFT JOIN pg_trigger tg ON tg.tgrelid = p.relid
		WHERE p.relid <> $1::regclass GROUP BY 1`, table)
	require.NoError(t, err)
	out := map[string]string{}
	for rows.Next() {
		var name string
		var stmt int
		var rowOn bool
		require.NoError(t, rows.Scan(&name, &stmt, &rowOn))
		out[name] = fmt.Sprintf("statement=%d row=%v", stmt, rowOn)
	}
	require.NoError(t, rows.Err())
	return out
}

// TestPartitionedTable: a statement wakes the watch whether it names the
// partitioned table, a partition, or a partition of a partition, created
// before the watch or after it, or attached later; each statement sends
// one notification, a bulk insert into a partition included.
func TestPartitionedTable(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	lg, opt := newLogs(t)
	d.exec(t, `CREATE TABLE jobs (queue text NOT NULL DEFAULT 'a',
		status text NOT NULL DEFAULT 'job_status_not_started', locked_by uuid,
		run_at timestamptz NOT NULL DEFAULT now()) PARTITION BY LIST (queue)`)
	d.exec(t, `CREATE TABLE jobs_a PARTITION OF jobs FOR VALUES IN ('a')`)
	d.exec(t, `CREATE TABLE jobs_bc PARTITION OF jobs FOR VALUES IN ('b', 'c') PARTITION BY LIST (queue)`)
	d.exec(t, `CREATE TABLE jobs_b PARTITION OF jobs_bc FOR VALUES IN ('b')`)
	w, ch, _ := d.watch(t, opt, watchSetup{interval: 50 * time.Millisecond, noTable: true, opts: []jobwatch.Option{jobwatch.WithJitter(0)}})
	assert.Equal(t, map[string]string{
		// A partitioned partition keeps its clone on: PostgreSQL copies it
		// onto the partitions created under it.
		"jobs_a": "statement=2 row=false", "jobs_bc": "statement=2 row=true", "jobs_b": "statement=2 row=false",
	}, partitionState(t, d, "jobs"))
	require.True(t, triggersHealthy(t, d.pool, "jobs"))

	o := observe(t, d, "jobs")
	done := "UPDATE jobs SET status = 'job_status_succeeded'" // leaves nothing pending: notifies nobody
	for _, c := range []struct{ stmt, want string }{
		{"INSERT INTO jobs (queue) VALUES ('a')", "g:"},
		{"INSERT INTO jobs_a DEFAULT VALUES", "g:"},
		{"INSERT INTO jobs_bc (queue) VALUES ('b')", "g:"},
		{"INSERT INTO jobs_b (queue) VALUES ('b')", "g:"},
		{"UPDATE jobs_a SET status = 'job_status_retry'", "g:due:2"},
		{"UPDATE jobs_b SET status = 'job_status_retry'", "g:due:2"},
		{"UPDATE jobs_bc SET status = 'job_status_retry' WHERE false", "none"},
	} {
		want := []string{c.want}
		if c.want == "none" {
			want = nil
		}
		assert.Equal(t, want, o.sent(t, c.stmt, done), c.stmt)
	}
	assert.Equal(t, []string{"g:due:1000"}, o.sent(t, "INSERT INTO jobs_a SELECT FROM generate_series(1, 1000)", done))
	assert.Equal(t, []string{"g:due:600"}, o.sent(t,
		"INSERT INTO jobs (queue) SELECT (ARRAY['a', 'b'])[1 + i % 2] FROM generate_series(1, 600) i", done))

	// Partitions that come later: their rows notify at once through their
	// clone of the row trigger, and once the watch has given them their
	// own statement triggers, once per statement again.
	d.exec(t, `CREATE TABLE jobs_c PARTITION OF jobs_bc FOR VALUES IN ('c')`)
	d.exec(t, `CREATE TABLE jobs_d (LIKE jobs INCLUDING DEFAULTS)`)
	d.exec(t, `ALTER TABLE jobs ATTACH PARTITION jobs_d FOR VALUES IN ('d')`)
	for _, stmt := range []string{"INSERT INTO jobs_c (queue) VALUES ('c')", "INSERT INTO jobs_d (queue) VALUES ('d')"} {
		got := o.sent(t, stmt, done)
		if len(got) == 1 && got[0] == "poll" {
			continue // the row trigger, before the repair
		}
		assert.Equal(t, []string{"g:"}, got, stmt+": the repair came first")
	}
	eventually(t, "the watch installs triggers on the new partitions", func() bool {
		s := partitionState(t, d, "jobs")
		return s["jobs_c"] == "statement=2 row=false" && s["jobs_d"] == "statement=2 row=false"
	})
	for _, stmt := range []string{"INSERT INTO jobs_c (queue) VALUES ('c')", "INSERT INTO jobs_d (queue) VALUES ('d')"} {
		assert.Equal(t, []string{"g:"}, o.sent(t, stmt, done), stmt)
	}
	assert.Equal(t, []string{"g:due:50"}, o.sent(t, "INSERT INTO jobs_c (queue) SELECT 'c' FROM generate_series(1, 50)", done))

	// The watch itself is woken by a statement naming a partition.
	drain(ch)
	before := w.Stats().Notifications
	d.exec(t, "INSERT INTO jobs_b (queue) VALUES ('b')")
	waitWake(t, ch, "insert into a partition")
	eventually(t, "notified", func() bool { return w.Stats().Notifications > before })
	assert.NotContains(t, lg.String(), "level=ERROR")
}

// TestPartitionRowTriggerBeforeRepair: with no watch running, a partition
// created after the triggers were installed still notifies, through the
// row trigger, one "poll" per transaction however many rows.
func TestPartitionRowTriggerBeforeRepair(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.exec(t, `CREATE TABLE jobs (queue text NOT NULL, status text NOT NULL DEFAULT 'job_status_not_started',
		locked_by uuid, run_at timestamp NOT NULL DEFAULT now()) PARTITION BY LIST (queue)`)
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs")) // as in a migration
	d.exec(t, `CREATE TABLE jobs_x PARTITION OF jobs FOR VALUES IN ('x')`)
	o := observe(t, d, "jobs")
	assert.Equal(t, []string{"poll"}, o.sent(t, "INSERT INTO jobs_x (queue) SELECT 'x' FROM generate_series(1, 100)"))
	assert.Empty(t, o.sent(t, "INSERT INTO jobs_x (queue, status) VALUES ('x', 'job_status_succeeded')"))
	assert.True(t, triggersHealthy(t, d.pool, "jobs"), "covered by the row trigger")
	d.exec(t, jobwatch.CreateNotificationTriggerSQL("jobs"))
	assert.Equal(t, map[string]string{"jobs_x": "statement=2 row=false"}, partitionState(t, d, "jobs"))
	assert.Equal(t, []string{"g:due:100"}, o.sent(t, "INSERT INTO jobs_x (queue) SELECT 'x' FROM generate_series(1, 100)"))
}

// TestTransactionBoundsNotifications: however many statements one
// transaction runs, it sends a bounded number of notifications, and the
// watch still wakes at the earliest run_at.
func TestTransactionBoundsNotifications(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	_, ch, _ := startWatch(t, d, "jobs", time.Hour, 10, opt, jobwatch.WithJitter(0))
	o := observe(t, d, "jobs")

	many := func(sql func(i int) string) []string {
		return o.during(t, func() {
			inTx(t, d, func(tx pgx.Tx) {
				for i := range 1000 {
					mustExec(t, tx, sql(i))
				}
			})
		})
	}
	// Scheduled in increasing order: the first time is the earliest.
	got := many(func(i int) string {
		return fmt.Sprintf("INSERT INTO jobs (run_at) VALUES (now() + interval '1 hour' + %d * interval '1 ms')", i)
	})
	assert.Len(t, got, 1, "%v", got)
	assert.True(t, strings.HasPrefix(got[0], "g:at:"), got[0])

	// Due now: PostgreSQL merges the identical payloads.
	assert.Equal(t, []string{"g:"}, many(func(int) string { return "INSERT INTO jobs (status) VALUES ('job_status_retry')" }))
	d.exec(t, "UPDATE jobs SET status = 'job_status_succeeded'")

	// Counts that all differ: bounded.
	got = many(func(i int) string { return fmt.Sprintf("INSERT INTO jobs SELECT FROM generate_series(1, %d)", i+2) })
	assert.Equal(t, []string{"g:due:2", "g:due:3", "g:due:4", "g:due:5", "g:poll"}, got)
	d.exec(t, "UPDATE jobs SET status = 'job_status_succeeded'")
	drain(ch)

	// Scheduled in decreasing order, the worst case: bounded, and the
	// watch wakes when the earliest (the last inserted) is due.
	got = many(func(i int) string {
		return fmt.Sprintf("INSERT INTO jobs (run_at) VALUES (now() + interval '300 ms' + %d * interval '1 ms')", 1000-i)
	})
	assert.LessOrEqual(t, len(got), 5, "%v", got)
	assert.Equal(t, "g:poll", got[len(got)-1])
	waitWake(t, ch, "the earliest scheduled job")
	var due bool
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT min(run_at) <= now() FROM jobs WHERE status = 'job_status_not_started'").Scan(&due))
	assert.True(t, due, "woken before the job was due")
}

// TestTableShapes: the statements and column types a job table may have.
func TestTableShapes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		table string // columns of jobs
		setup string
		stmts []string
		want  []string
	}{
		{name: "status as a domain over text", table: "status job_state NOT NULL DEFAULT 'job_status_not_started', locked_by uuid, run_at timestamptz NOT NULL DEFAULT now()",
			setup: "CREATE DOMAIN job_state AS text CHECK (VALUE LIKE 'job_status_%')",
			stmts: []string{"INSERT INTO jobs DEFAULT VALUES"}, want: []string{"g:"}},
		{name: "INSERT ON CONFLICT DO UPDATE", table: "id int PRIMARY KEY, status text NOT NULL DEFAULT 'job_status_not_started', locked_by uuid, run_at timestamptz NOT NULL DEFAULT now()",
			stmts: []string{"INSERT INTO jobs (id, status) VALUES (1, 'job_status_failed')",
				"INSERT INTO jobs (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET status = 'job_status_retry'"},
			want: []string{"g:"}},
		{name: "MERGE", table: "id int PRIMARY KEY, status text NOT NULL DEFAULT 'job_status_not_started', locked_by uuid, run_at timestamptz NOT NULL DEFAULT now()",
			stmts: []string{"MERGE INTO jobs j USING (SELECT 1 AS id) s ON j.id = s.id WHEN NOT MATCHED THEN INSERT (id) VALUES (s.id)",
				"MERGE INTO jobs j USING (SELECT 1 AS id) s ON j.id = s.id WHEN MATCHED THEN UPDATE SET status = 'job_status_retry'"},
			want: []string{"g:", "g:"}},
		{name: "row-level security", table: "id int, status text NOT NULL DEFAULT 'job_status_not_started', locked_by uuid, run_at timestamptz NOT NULL DEFAULT now()",
			setup: "", stmts: []string{"INSERT INTO jobs (id) VALUES (1), (2)"}, want: []string{"g:due:2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDB(t)
			lg, opt := newLogs(t)
			if c.setup != "" {
				d.exec(t, c.setup)
			}
			d.exec(t, "CREATE TABLE jobs ("+c.table+")")
			if c.name == "row-level security" {
				d.exec(t, `ALTER TABLE jobs ENABLE ROW LEVEL SECURITY; ALTER TABLE jobs FORCE ROW LEVEL SECURITY;
					CREATE POLICY see_odd ON jobs FOR SELECT USING (id % 2 = 1); CREATE POLICY add ON jobs FOR INSERT WITH CHECK (true)`)
			}
			w, _, _ := d.watch(t, opt, watchSetup{noTable: true})
			o := observe(t, d, "jobs")
			assert.Equal(t, c.want, o.sent(t, c.stmts...))
			eventually(t, "the watch got them", func() bool { return w.Stats().Notifications == uint64(len(c.want)) })
			assert.NotContains(t, lg.String(), "level=ERROR")
			assert.NoError(t, w.Stats().LastError)
		})
	}
}

// TestCopyNotifies: COPY fires the statement triggers like an INSERT.
func TestCopyNotifies(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	d.jobTable(t, "jobs")
	_, opt := newLogs(t)
	require.NoError(t, jobwatch.EnsureNotificationTriggers(ctxT(t), d.pool, "jobs", opt))
	o := observe(t, d, "jobs")
	got := o.during(t, func() {
		rows := [][]any{{"job_status_not_started"}, {"job_status_not_started"}, {"job_status_succeeded"}}
		n, err := d.pool.CopyFrom(ctxT(t), pgx.Identifier{"jobs"}, []string{"status"}, pgx.CopyFromRows(rows))
		require.NoError(t, err)
		require.EqualValues(t, 3, n)
	})
	assert.Equal(t, []string{"g:due:2"}, got)
}

// TestRunAtWithoutTimeZone: a run_at without time zone is read in the
// session's TimeZone; a scheduled job is woken when it is due.
func TestRunAtWithoutTimeZone(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	d.exec(t, `CREATE TABLE jobs (status text NOT NULL DEFAULT 'job_status_not_started', locked_by uuid,
		run_at timestamp NOT NULL DEFAULT localtimestamp)`)
	_, ch, _ := d.watch(t, opt, watchSetup{noTable: true, opts: []jobwatch.Option{jobwatch.WithJitter(0)}})
	d.exec(t, "INSERT INTO jobs (run_at) VALUES (localtimestamp + interval '300 milliseconds')")
	waitWake(t, ch, "scheduled job, timestamp without time zone")
	var due bool
	require.NoError(t, d.pool.QueryRow(ctxT(t), "SELECT run_at <= localtimestamp FROM jobs").Scan(&due))
	assert.True(t, due, "woken before run_at")
}

// TestReplicationRoleReplica: with session_replication_role = replica (a
// restore, logical replication) no trigger fires; the poller finds the
// jobs at its next poll.
func TestReplicationRoleReplica(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, opt := newLogs(t)
	w, ch, _ := startWatch(t, d, "jobs", 200*time.Millisecond, 10, opt, jobwatch.WithJitter(0))
	o := observe(t, d, "jobs")
	got := o.during(t, func() {
		inTx(t, d, func(tx pgx.Tx) {
			_, err := tx.Exec(ctxT(t), "SET LOCAL session_replication_role = replica")
			require.NoError(t, err, "this test needs a role that may set session_replication_role (a superuser)")
			mustExec(t, tx, "INSERT INTO jobs DEFAULT VALUES")
		})
	})
	assert.Empty(t, got, "no trigger fired")
	waitWake(t, ch, "found by the poller")
	assert.EqualValues(t, 0, w.Stats().Notifications, "woken by a poll")
}
