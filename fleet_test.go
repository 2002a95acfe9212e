package jobwatch_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A fleet (WithFleet): processes watching one table share its wake-ups.
// Each member below is what a process is, a Listener of its own (its own
// session, so its own presence lock) with a watch and a worker that
// fetches one job per query on each wake-up until none is due.

// fleetMember is one member and its worker.
type fleetMember struct {
	w       *jobwatch.Watch
	l       *jobwatch.Listener
	wake    chan jobwatch.Message
	fetches atomic.Int64 // fetch queries sent
	got     atomic.Int64 // jobs fetched
	busy    atomic.Bool  // room() says 0 while set
	paused  atomic.Bool  // the worker does not read its channel while set
	stop    context.CancelFunc
	done    chan struct{}
}

// startFleet starts n members on table, each with its own Listener, and
// waits until each sees all of them.
func startFleet(t *testing.T, d db, table string, n int, logger jobwatch.Option) []*fleetMember {
	t.Helper()
	ms := make([]*fleetMember, n)
	for i := range ms {
		m := &fleetMember{wake: make(chan jobwatch.Message, 4), done: make(chan struct{})}
		room := func() int {
			if m.busy.Load() {
				return 0
			}
			return 4
		}
		l := testListener(t, d.url, logger)
		w, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, table, time.Hour, m.wake, logger, jobwatch.WithFleet(room))
		require.NoError(t, err)
		m.w, m.l = w, l
		ctx, cancel := context.WithCancel(context.Background())
		m.stop = cancel
		go m.work(ctx, d, table)
		t.Cleanup(func() { cancel(); <-m.done; _ = w.Close() })
		ms[i] = m
	}
	eventually(t, "every member sees the whole fleet", func() bool {
		for _, m := range ms {
			if s := m.w.Stats().Fleet; !s.Member || s.Members != n {
				return false
			}
		}
		return true
	})
	for _, m := range ms { // the start-up's wake-ups
		eventually(t, "first poll", func() bool { return m.w.Stats().Polls >= 1 })
	}
	return ms
}

// work fetches on each wake-up until no job is due; a fetched job is done
// at once.
func (m *fleetMember) work(ctx context.Context, d db, table string) {
	defer close(m.done)
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
		}
		for m.paused.Load() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Millisecond):
			}
		}
		// Up to fleetBatch jobs a query, until a query finds fewer: one
		// fetch query per wake-up when jobs come one at a time.
		for {
			m.fetches.Add(1)
			var n int64
			err := d.pool.QueryRow(ctx, `WITH f AS (UPDATE `+table+` SET status = 'job_status_succeeded', locked_at = now()
				WHERE id IN (SELECT id FROM `+table+` WHERE status = 'job_status_not_started' AND run_at <= now()
				ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING 1) SELECT count(*) FROM f`, fleetBatch).Scan(&n)
			m.got.Add(n)
			if err != nil || n < fleetBatch {
				break
			}
		}
	}
}

// fleetBatch is how many jobs a test worker fetches at most per query.
const fleetBatch = 4

// fleetTable is a job table whose jobs the fleet workers can fetch.
func fleetTable(t *testing.T, d db, table string) {
	t.Helper()
	d.exec(t, `CREATE TABLE `+table+` (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'job_status_not_started',
		locked_by uuid, locked_at timestamptz, run_at timestamptz NOT NULL DEFAULT now(), created_at timestamptz NOT NULL DEFAULT now())`)
}

// insertOneByOne inserts n jobs into jobs, each once the one before was
// fetched.
func insertOneByOne(t *testing.T, d db, n int) {
	t.Helper()
	before := fetched(t, d, "jobs")
	for i := range n {
		d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
		eventually(t, "the job fetched", func() bool { return fetched(t, d, "jobs") == before+i+1 })
	}
}

// fetched is how many jobs of table have been fetched.
func fetched(t *testing.T, d db, table string) int {
	var n int
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT count(*) FROM `+table+` WHERE status <> 'job_status_not_started'`).Scan(&n))
	return n
}

// TestFleetOneWakePerJob: four members, jobs inserted one per
// transaction; each is fetched by one member, with about one fetch query
// per job in all, spread over the members.
func TestFleetOneWakePerJob(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	logs, logger := newLogs(t)
	fleetTable(t, d, "jobs")
	ms := startFleet(t, d, "jobs", 4, logger)
	before := int64(0)
	for _, m := range ms {
		before += m.fetches.Load()
	}
	const jobs = 100
	insertOneByOne(t, d, jobs)
	// The chosen member may fetch the last job before the others have
	// read its notification and counted it as left to another.
	leftAll := func() (n int64) {
		for _, m := range ms {
			n += int64(m.w.Stats().Fleet.Left)
		}
		return n
	}
	eventually(t, "every member read every notification", func() bool { return leftAll() >= 3*jobs })
	var fetches, left, chosen int64
	spread := 0
	for _, m := range ms {
		fetches += m.fetches.Load()
		s := m.w.Stats()
		left += int64(s.Fleet.Left)
		chosen += int64(s.Fleet.Chosen)
		if m.got.Load() > 0 {
			spread++
		}
	}
	fetches -= before
	t.Logf("%d jobs: %d fetch queries; notifications chosen %d, left %d", jobs, fetches, chosen, left)
	assert.LessOrEqual(t, fetches, int64(jobs*3/2), "at most 1.5 fetch queries per job (a fetch that finds the job, one that finds none)")
	assert.Equal(t, int64(jobs), chosen, "each notification chosen once")
	assert.Equal(t, int64(3*jobs), left)
	assert.Equal(t, 4, spread, "every member ran jobs")
	noRescue(t, d, "jobs", ms, "no job left behind")
	assert.Zero(t, logs.count("level=ERROR"), logs.String())
}

// noRescue asserts that no member woke for a job left behind, unless a
// job did wait about as long as the rescue waits for (a fetch that a
// loaded machine held up): the rescue is for jobs that wait, and only
// for them.
func noRescue(t *testing.T, d db, table string, ms []*fleetMember, what string) {
	t.Helper()
	var rescues uint64
	for _, m := range ms {
		rescues += m.w.Stats().Wakeups.Rescue
	}
	var late time.Duration
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT coalesce(max(locked_at - run_at), '0') FROM `+table).Scan(&late))
	assert.True(t, rescues == 0 || late > fleetStaleTest, "%s: %d rescue wake-ups, longest wait %v", what, rescues, late)
}

// fleetStaleTest is a little less than the age at which the rescue takes
// a job (250ms): a fetch that started before the rescue's query may still
// be in flight for it.
const fleetStaleTest = 150 * time.Millisecond

// TestFleetBusyChosen: a member with no room passes the wake-up on; every
// job is fetched by another member, none by the busy one, and no job
// waits for the rescue.
func TestFleetBusyChosen(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, logger := newLogs(t)
	fleetTable(t, d, "jobs")
	ms := startFleet(t, d, "jobs", 3, logger)
	ms[0].busy.Store(true)
	const jobs = 30
	insertOneByOne(t, d, jobs)
	s := ms[0].w.Stats()
	assert.Zero(t, ms[0].got.Load(), "the busy member fetched nothing")
	assert.Positive(t, s.Fleet.Passed, "it was chosen for some and passed them on")
	noRescue(t, d, "jobs", ms, "every pass arrived")
}

// TestFleetStalledChosen: a member whose worker stops reading its
// channel (a process stopped, or cut off with its session alive): the
// jobs chosen for it are found by the other's rescue.
func TestFleetStalledChosen(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, logger := newLogs(t)
	fleetTable(t, d, "jobs")
	ms := startFleet(t, d, "jobs", 2, logger)
	ms[0].paused.Store(true)
	// Jobs one at a time until one was chosen for the stalled member
	// (each is, one time in two).
	for i := 0; ms[0].w.Stats().Fleet.Chosen == 0; i++ {
		require.Less(t, i, 60, "the stalled member chosen for one of 60 jobs")
		insertOneByOne(t, d, 1)
	}
	assert.Positive(t, ms[1].w.Stats().Wakeups.Rescue, "the stalled member's jobs were rescued")
	var late time.Duration
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT coalesce(max(locked_at - created_at), '0') FROM jobs`).Scan(&late))
	// The bound (about 750ms) is measured by the fleet benchmark, not
	// asserted here.
	t.Logf("longest wait, commit to fetch: %v", late)
}

// TestFleetKilledChosen: a member that is a session holding the presence
// lock and never acting (a stopped process's Listener), then terminated
// (as a killed process's session is): its jobs are rescued, its lock goes
// with its session, and the others take every job.
func TestFleetKilledChosen(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	_, logger := newLogs(t)
	fleetTable(t, d, "jobs")
	ms := startFleet(t, d, "jobs", 3, logger)
	// A member that is only a session: it holds the presence lock of the
	// fleet's key, as a process's Listener does, and never acts.
	key := fleetKey(t, d)
	ghost, err := pgx.Connect(ctxT(t), d.url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ghost.Close(context.Background()) })
	var pid int32
	var held bool
	require.NoError(t, ghost.QueryRow(ctxT(t), "SELECT pg_backend_pid(), pg_try_advisory_lock($1::int4, pg_backend_pid())", key).Scan(&pid, &held))
	require.True(t, held)
	eventually(t, "the ghost is a member", func() bool { return ms[1].w.Stats().Fleet.Members == 4 })
	for range 20 {
		d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	}
	d.exec(t, "SELECT pg_terminate_backend($1)", pid)
	eventually(t, "every job fetched", func() bool { return fetched(t, d, "jobs") == 20 })
	eventually(t, "the ghost is gone", func() bool { return ms[1].w.Stats().Fleet.Members == 3 })
}

// TestFleetAnotherRole: a role that may not write the table holds
// presence locks named for its own pid and for a member's, and sends
// payloads of its own on the channel. It never becomes a member, no job
// waits for the rescue, and every job is fetched.
func TestFleetAnotherRole(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	logs, logger := newLogs(t)
	fleetTable(t, d, "jobs")
	ms := startFleet(t, d, "jobs", 2, logger)
	key := fleetKey(t, d)
	intruder := connectAs(t, d, role(t, d))
	_, err := intruder.Exec(ctxT(t), "SELECT pg_advisory_lock($1::int4, pg_backend_pid())", key)
	require.NoError(t, err)
	// Its lock on a member's pair waits, and takes nothing from the member.
	var memberPid int32
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT min(pid) FROM pg_locks WHERE locktype = 'advisory'
		AND classid = $1::int8 AND objsubid = 2 AND objid::int8 = pid AND pid <> $2
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`, key, intruder.PgConn().PID()).Scan(&memberPid))
	var took bool
	require.NoError(t, intruder.QueryRow(ctxT(t), "SELECT pg_try_advisory_lock($1::int4, $2::int4)", key, memberPid).Scan(&took))
	require.False(t, took)
	_, err = intruder.Exec(ctxT(t), "SELECT pg_notify('job_available_jobs', 'x:1 f:1 due:1000'), pg_notify('job_available_jobs', 'x:99 ')")
	require.NoError(t, err)
	// Checks later the intruder is still not counted: the Listener's
	// queries are its health, delivery, gate and fleet checks, the last
	// two every 500ms.
	checks := ms[0].l.Stats().Queries
	eventually(t, "three more checks", func() bool { return ms[0].l.Stats().Queries >= checks+6 })
	assert.Equal(t, 2, ms[0].w.Stats().Fleet.Members, "only the two members count")
	const jobs = 30
	insertOneByOne(t, d, jobs)
	noRescue(t, d, "jobs", ms, "no job waited for the rescue")
	assert.Zero(t, logs.count("level=ERROR"), logs.String())
}

// fleetKey is the presence key the test's fleet holds (every member the
// same), read from pg_locks.
func fleetKey(t *testing.T, d db) int32 {
	t.Helper()
	var key int64
	require.NoError(t, d.pool.QueryRow(ctxT(t), `SELECT DISTINCT classid::int8 FROM pg_locks
		WHERE locktype = 'advisory' AND objsubid = 2 AND objid::int8 = pid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&key))
	return int32(key)
}

// TestFleetOptionRefused: WithFleet applies to watches only, and needs a
// RunAt column to find the jobs a failed process left behind.
func TestFleetOptionRefused(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	fleetTable(t, d, "jobs")
	l := testListener(t, d.url)
	wake := make(chan jobwatch.Message, 1)
	_, err := jobwatch.WatchForJob(ctxT(t), d.pool, l, "jobs", time.Hour, wake,
		jobwatch.WithJobTable(jobwatch.JobTable{Pending: "status = 'job_status_not_started'"}), jobwatch.WithFleet(nil))
	require.ErrorIs(t, err, jobwatch.ErrInvalidOption)
	assert.Contains(t, err.Error(), "WithFleet needs a JobTable with a RunAt column")
	_, err = jobwatch.PollForJob(ctxT(t), false, d.pool, "jobs", time.Hour, wake, jobwatch.WithFleet(nil))
	require.ErrorIs(t, err, jobwatch.ErrInvalidOption)
	assert.Contains(t, err.Error(), "WithFleet does not apply")
}
