package jobwatch

import (
	"context"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// The fleet (WithFleet): processes that watch one table share its
// wake-ups, so that each job wakes one process, not all of them.
//
// Members. Each member's Listener holds, on its own connection, the
// presence lock of the fleet's key (see present): the table's channel and
// the watch's queues. The fleet check of each Listener and pool reads the
// holders from pg_locks (every fleetMembersEvery, doubling to
// fleetMembersMax while nothing changes), keeping those whose role may
// UPDATE the table: a session of another role can hold any advisory lock,
// but cannot become a member. A process that dies takes its lock with its
// session, and is gone from the next read.
//
// Ranking. Every trigger's notification carries its transaction's id
// ("x:<xid>"), the same for every receiver. Each member ranks the members
// for it by rendezvous hashing (hash of the id and the member's pid, the
// highest first) and acts only when it ranks first. A chosen process
// without room (its wake channel, and the caller's WithFleet room) wakes
// what it has room for and passes the rest on to the next rank with a
// NOTIFY ("x:<xid> f:<rank> due:<n>"), at most fleetHops times; the last
// one keeps it. A notification without an id, and "poll", reaches every
// member as before.
//
// Rescue. A chosen process may be gone without its lock being gone yet (a
// black-holed connection, a process stopped, one killed between two
// checks), or a pass may be lost. So in every fleetCheckEvery slot of the
// clock, fleetCheckers members (ranked first for the slot) count the
// table's jobs that have been due for fleetStale and are still pending:
// such a job was not taken by the process chosen for it, and the checker
// wakes for it, passing on what it has no room for. A job waits at most
// about fleetStale plus fleetCheckEvery for that, whatever the poll
// interval, unless every checker of a slot is stopped too.

const (
	fleetCheckEvery = 500 * time.Millisecond
	fleetStale      = 250 * time.Millisecond
	// fleetHops bounds how many times a wake-up is passed on: a fleet
	// where that many processes in a row have no room keeps it in the
	// last, and the rescue finds it for any process that has room.
	fleetHops = 3
	// fleetPassQueue bounds the passes waiting to be sent; beyond it they
	// are dropped, and the rescue finds their jobs.
	fleetPassQueue = 256
)

// fleet is a watch's membership of its table's fleet.
type fleet struct {
	key     int32        // the presence key: the channel and the queues
	room    func() int   // the caller's free slots; nil: the wake channel's room alone
	l       *Listener    // whose connection holds the presence lock
	channel string       // the table's channel, to pass wake-ups on
	queues  []string     // WithQueues, sorted
	stop    func()       // releases the presence lock
	members atomic.Value // []int32: the last check's members, sorted; unset until one ran

	passes chan string // payloads to pass on
	done   chan struct{}
	cancel context.CancelFunc

	chosen, left, passed, dropped, rescues atomic.Uint64
	problems                               problemLog // the fleet check's alone
}

// fleetKey is the presence key of table's channel watched for queues: a
// non-negative int32, so that pg_locks shows it as it is.
func fleetKey(channel string, queues []string) int32 {
	h := fnv.New32a()
	h.Write([]byte(channel))
	for _, q := range queues {
		h.Write([]byte{0})
		h.Write([]byte(q))
	}
	return int32(h.Sum32() & 0x7fffffff)
}

// joinFleet makes the watch a member: its Listener holds the presence
// lock from its next turn, and passes go out through pool.
func joinFleet(l *Listener, pool *pgxpool.Pool, channel string, o options) *fleet {
	queues := slices.Sorted(slices.Values(o.queues))
	f := &fleet{
		key: fleetKey(channel, queues), room: o.room, l: l, channel: channel, queues: queues,
		passes: make(chan string, fleetPassQueue), done: make(chan struct{}),
		problems: problemLog{log: o.logger, remind: pollRemind},
	}
	f.stop = l.present(f.key)
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	go f.send(ctx, pool)
	return f
}

// leave releases the presence lock and stops passing wake-ups on.
func (f *fleet) leave() {
	if f == nil {
		return
	}
	f.stop()
	f.cancel()
	<-f.done
}

// rank is this process's rank among the members for the notification id
// key, and their number; rank -1 when it is not a member now (its lock is
// not held, or the last check did not see it yet), and then it acts as if
// alone.
func (f *fleet) rank(key uint64) (rank, size int) {
	st, _ := f.l.connection()
	ms, _ := f.members.Load().([]int32)
	own := int32(st.pid)
	if !st.up || !st.present[f.key] || !slices.Contains(ms, own) {
		return -1, 0
	}
	mine := fleetScore(key, own)
	for _, pid := range ms {
		if s := fleetScore(key, pid); pid != own && (s > mine || (s == mine && pid < own)) {
			rank++
		}
	}
	return rank, len(ms)
}

// fleetScore is the rendezvous hash of a notification id and a member.
func fleetScore(key uint64, pid int32) uint64 {
	z := key ^ (uint64(uint32(pid)) * 0x9e3779b97f4a7c15)
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// roomFor is how many wake-ups the process takes now: the wake channel's
// room, and the caller's, when it said.
func (f *fleet) roomFor(c *counters) int64 {
	room := c.room()
	if f.room != nil {
		room = min(room, int64(max(f.room(), 0)))
	}
	return room
}

// pass has n due jobs of the notification id key woken by the member of
// rank hop instead of this one; false when the queue of passes is full.
func (f *fleet) pass(key uint64, hop int, n int64, p Payload) bool {
	payload := payloadKey + strconv.FormatUint(key, 10) + " " + payloadHop + strconv.Itoa(hop) + " " +
		payloadDue + strconv.FormatInt(min(n, maxDueCount), 10)
	if p.Queued {
		payload += payloadQueue + p.Queue
	}
	select {
	case f.passes <- payload:
		f.passed.Add(1)
		return true
	default:
		f.dropped.Add(1)
		return false
	}
}

// send sends the passes, one NOTIFY each, until ctx ends.
func (f *fleet) send(ctx context.Context, pool *pgxpool.Pool) {
	defer close(f.done)
	for {
		select {
		case <-ctx.Done():
			return
		case payload := <-f.passes:
			qctx, cancel := context.WithTimeout(ctx, queryTimeout)
			_, err := pool.Exec(qctx, `SELECT pg_catalog.pg_notify($1, $2)`, f.channel, payload)
			cancel()
			if err != nil {
				f.dropped.Add(1) // the rescue finds the job
			}
		}
	}
}

// share decides whether this process acts on p, a notification with an
// id: when it is not a member now, or is the member ranked first for it,
// or the one a pass names. For a wake-up it keeps what it has room for and
// passes the rest on, and p.Due becomes what it keeps.
func (f *fleet) share(p Payload, c *counters, queues map[string]bool) (Payload, bool) {
	rank, size := f.rank(p.Key)
	if rank < 0 {
		return p, true
	}
	last := min(size-1, fleetHops)
	if rank != min(p.Hop, last) {
		f.left.Add(1)
		return p, false
	}
	f.chosen.Add(1)
	if p.Due == 0 || (p.Queued && queues != nil && !queues[p.Queue]) {
		return p, true // not a wake-up for this process to share out
	}
	take := min(p.Due, f.roomFor(c))
	if take < p.Due && rank < last && f.pass(p.Key, rank+1, p.Due-take, p) {
		p.Due = take
		return p, take > 0
	}
	return p, true // the last keeps it all: it fetches when a slot frees
}

// passExcess has n due jobs that a poll of this process found, beyond its
// room, woken by another member: under a fresh id, to the member ranked
// first for it, or second when that is this one.
func (f *fleet) passExcess(n int64) {
	key := rand.Uint64() | 1
	rank, size := f.rank(key)
	if rank < 0 || size < 2 {
		return
	}
	hop := 0
	if rank == 0 {
		hop = 1
	}
	f.pass(key, hop, n, Payload{})
}

// chosenFor reports whether this process acts on what key stands for
// (a skip counter's value): always outside a fleet.
func (f *fleet) chosenFor(key uint64) bool {
	if f == nil {
		return true
	}
	rank, _ := f.rank(key)
	return rank <= 0
}

// fleetCheck is the periodic look, for the watches a poolMonitor serves
// that are in a fleet, at their fleets' members (one query for all of them
// every fleetMembersEvery) and, in the slots this process checks, at jobs
// the process chosen for them did not take (one query for IHP's tables,
// one each for other JobTables).
type fleetCheck struct {
	m      *poolMonitor
	cancel context.CancelFunc
	done   chan struct{}
	// The loop's own: when members were last read, and the wait until the
	// next read, fleetMembersEvery doubling to fleetMembersMax while no
	// list changes.
	refreshed time.Time
	every     backoff
	wait      time.Duration
	problems  problemLog
}

func startFleetCheck(m *poolMonitor) *fleetCheck {
	ctx, cancel := context.WithCancel(context.Background())
	c := &fleetCheck{m: m, cancel: cancel, done: make(chan struct{}), problems: problemLog{log: m.l.log, remind: pollRemind},
		every: backoff{min: fleetMembersEvery, max: fleetMembersMax}}
	go c.run(ctx)
	return c
}

func (c *fleetCheck) stop() {
	if c != nil {
		c.cancel()
		<-c.done
	}
}

func (c *fleetCheck) run(ctx context.Context) {
	defer close(c.done)
	for {
		c.check(ctx, time.Now())
		// The next slot's start on the clock, plus a margin: members on
		// clocks a little apart agree on the slot.
		now := time.Now()
		next := now.Truncate(fleetCheckEvery).Add(fleetCheckEvery + fleetSlotMargin)
		t := time.NewTimer(next.Sub(now))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// The fleet check's rhythm. Each process reads its fleets' members every
// fleetMembersEvery, doubling to fleetMembersMax while they stay the same
// (pg_locks holds the lock manager for a moment), back to
// fleetMembersEvery when a list changes or lacks the process itself. A
// member that joined is seen late only by those reading slowly, and until
// then a job may be fetched twice (a newcomer ranked first changes no one
// else's choice: rendezvous hashing); one that left is replaced by the
// rescue meanwhile. In each fleetCheckEvery slot of the clock, the
// fleetCheckers members ranked first for the slot (and a process that is
// not a member) look for jobs left behind: a fleet's cost does not grow
// with its size, and a slot whose first checker is stopped still has
// others.
const (
	fleetMembersEvery = time.Second
	fleetMembersMax   = 8 * time.Second
	fleetCheckers     = 3
	fleetSlotMargin   = 100 * time.Millisecond
)

// checker reports whether this process looks for jobs left behind in slot.
// The ranking is the slot's alone, so that a process that is a checker of
// one table's fleet is one of every table's with the same members, and
// sends one query for all of them.
func (f *fleet) checker(slot int64) bool {
	rank, _ := f.rank(uint64(slot))
	return rank < fleetCheckers
}

// fleetMembersSQL is a query of the members of the presence keys $1 of
// the tables $2, one array each: the sessions that hold a key's lock in
// this database whose role may UPDATE its table. Roles are looked up once
// for all the members.
const fleetMembersSQL = `WITH m AS (
	SELECT l.classid::pg_catalog.int8 AS k, l.pid, a.usesysid AS r
	  FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_get_activity(NULL) a ON a.pid OPERATOR(pg_catalog.=) l.pid
	 WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.objsubid OPERATOR(pg_catalog.=) 2 AND l.granted
	   AND l.objid::pg_catalog.int8 OPERATOR(pg_catalog.=) l.pid
	   AND l.database OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
	   AND l.classid::pg_catalog.int8 OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.int8[])),
roles AS (SELECT DISTINCT m.r FROM m),
allowed AS (
	SELECT t.k, roles.r FROM roles, ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.text[])) AS t(k, tbl)
	 WHERE pg_catalog.has_table_privilege(roles.r, pg_catalog.to_regclass(t.tbl), 'UPDATE'))
SELECT ARRAY(SELECT m.pid FROM m JOIN allowed a ON a.k OPERATOR(pg_catalog.=) m.k AND a.r OPERATOR(pg_catalog.=) m.r
	WHERE m.k OPERATOR(pg_catalog.=) t.k ORDER BY 1)
  FROM pg_catalog.unnest($1::pg_catalog.int8[]) WITH ORDINALITY AS t(k, i) ORDER BY t.i`

// staleMark is the SQL for fleetStale, the age of a job that its chosen
// process did not take.
var staleMark = `pg_catalog.now() OPERATOR(pg_catalog.-) '` + strconv.Itoa(int(fleetStale/time.Millisecond)) + ` ms'::pg_catalog.interval`

// check reads the fleets' members when they are due, and in the slots
// this process checks, the jobs left behind, and wakes for these.
func (c *fleetCheck) check(ctx context.Context, now time.Time) {
	var fleets []*Poller
	for _, p := range c.m.members() {
		if p.fleet != nil {
			fleets = append(fleets, p)
		}
	}
	if len(fleets) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fleetCheckEvery)
	defer cancel()
	if c.refreshed.IsZero() || now.Sub(c.refreshed) >= c.wait {
		c.refreshed = now
		if c.readMembers(ctx, fleets) {
			c.every.reset()
		}
		c.wait = c.every.delay()
	}
	slot := now.UnixMilli() / fleetCheckEvery.Milliseconds()
	var ihp []*Poller
	for _, p := range fleets {
		switch {
		case !p.fleet.checker(slot):
		case p.names.custom():
			if n, ok := customLeftBehind(ctx, p); ok && n > 0 {
				p.rescue(n)
			}
		default:
			ihp = append(ihp, p)
		}
	}
	if len(ihp) == 0 {
		return
	}
	cols := make([]string, len(ihp))
	counts := make([]int64, len(ihp))
	dest := make([]any, len(ihp))
	for i, p := range ihp {
		cols[i] = `(SELECT count(*) FROM (SELECT 1 FROM ` + p.names.table.quoted() + ` WHERE ` + pendingNow +
			` AND run_at <= ` + staleMark + ` LIMIT ` + strconv.Itoa(p.stats.capacity()) + `) s)`
		dest[i] = &counts[i]
	}
	c.m.l.stats.queries.Add(1)
	if c.m.pool.QueryRow(ctx, `SELECT `+strings.Join(cols, ", ")).Scan(dest...) != nil {
		return // the polls report the server's trouble
	}
	for i, p := range ihp {
		if counts[i] > 0 {
			p.rescue(counts[i])
		}
	}
}

// readMembers reads the members of the fleets of ps, in one query, and
// reports whether a list is new, changed, or lacks this process (its own
// member is not seen yet): then members are read again soon.
func (c *fleetCheck) readMembers(ctx context.Context, ps []*Poller) (changed bool) {
	keys := make([]int64, len(ps))
	tables := make([]string, len(ps))
	for i, p := range ps {
		keys[i], tables[i] = int64(p.fleet.key), p.names.table.quoted()
	}
	c.m.l.stats.queries.Add(1)
	members := make([][]int32, 0, len(ps))
	rows, err := c.m.pool.Query(ctx, fleetMembersSQL, keys, tables)
	if err == nil {
		for rows.Next() {
			var ms []int32
			if err = rows.Scan(&ms); err != nil {
				break
			}
			members = append(members, ms)
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	if err != nil || len(members) != len(ps) {
		// Members keep the last list they read: a member that is gone
		// meanwhile leaves its jobs to the rescue.
		c.problems.report(slog.LevelWarn, "members", "jobwatch: cannot read the fleet's members; the last list read stands",
			"error", err)
		return true
	}
	c.problems.clear("jobwatch: the fleet's members can be read again")
	st, _ := c.m.l.connection()
	for i, p := range ps {
		old, _ := p.fleet.members.Load().([]int32)
		if old == nil || !slices.Equal(old, members[i]) || !slices.Contains(members[i], int32(st.pid)) {
			changed = true
		}
		p.fleet.members.Store(members[i])
		if st.refused[p.fleet.key] {
			p.fleet.problems.report(slog.LevelWarn, "refused",
				"jobwatch: another session holds this Listener's fleet lock: this process is woken for every job of the table, as without WithFleet",
				"table", p.names.table.raw, "pid", st.pid)
		}
	}
	return changed
}

// customLeftBehind counts, for a JobTable other than IHP's, the jobs due
// for fleetStale and still pending (none whose RunAt is NULL).
func customLeftBehind(ctx context.Context, p *Poller) (int64, bool) {
	d, err := p.shape.get(ctx, p.pool, p.names)
	if err != nil {
		return 0, false
	}
	var n int64
	p.stats.queries.Add(1)
	where := customWhere(p.names, d, p.opts.queues) + ` AND ` + jobExprs(p.names.job).dueAt + ` <= ` + staleMark
	err = queryPinned(ctx, p.pool, `SELECT count(*) FROM (SELECT 1 FROM `+d.table+` j WHERE `+where+
		` LIMIT `+strconv.Itoa(p.stats.capacity())+`) s`, &n)
	return n, err == nil
}

// rescue wakes the watch for n jobs that the process chosen for them did
// not take, as far as it has room, and passes the rest on.
func (p *Poller) rescue(n int64) {
	p.post(func() {
		take := min(n, p.fleet.roomFor(p.stats))
		if take < n {
			p.fleet.passExcess(n - take)
		}
		if take > 0 {
			p.fleet.rescues.Add(uint64(take))
			p.stats.wake(take, causeRescue)
		}
	})
}
