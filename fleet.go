package jobwatch

import (
	"context"
	"hash/fnv"
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
// the watch's queues. Every fleetCheckEvery, the poolMonitor of each
// Listener and pool reads the holders from pg_locks, keeping those whose
// role may UPDATE the table: a session of another role can hold any
// advisory lock, but cannot become a member. A process that dies takes
// its lock with its session, and is gone from the next check.
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
// checks), or a pass may be lost. So the same check counts each fleet
// table's jobs that have been due for fleetStale and are still pending:
// such a job was not taken by the process chosen for it, and every member
// with room is woken for it. A job waits at most about fleetStale plus
// fleetCheckEvery for that, whatever the poll interval.

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
// that are in a fleet, at their fleets' members and at jobs the process
// chosen for them did not take: one query for all of them every
// fleetCheckEvery (and one more for the JobTables other than IHP's).
type fleetCheck struct {
	m      *poolMonitor
	cancel context.CancelFunc
	done   chan struct{}
}

func startFleetCheck(m *poolMonitor) *fleetCheck {
	ctx, cancel := context.WithCancel(context.Background())
	c := &fleetCheck{m: m, cancel: cancel, done: make(chan struct{})}
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
	t := time.NewTicker(fleetCheckEvery)
	defer t.Stop()
	for {
		c.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// fleetMembersCTE are the sessions that hold a presence lock in this
// database: the lock's key, the session's pid and role.
const fleetMembersCTE = `WITH m AS (
	SELECT l.classid::pg_catalog.int8 AS k, l.pid, a.usesysid
	  FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
	 WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.objsubid OPERATOR(pg_catalog.=) 2 AND l.granted
	   AND l.objid::pg_catalog.int8 OPERATOR(pg_catalog.=) l.pid
	   AND l.database OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database()))`

// fleetMembersSQL are the members of key: sessions holding its presence
// lock whose role may UPDATE table (a regclass literal's text).
func fleetMembersSQL(key int32, table string) string {
	return `ARRAY(SELECT m.pid FROM m WHERE m.k OPERATOR(pg_catalog.=) ` + strconv.Itoa(int(key)) +
		` AND pg_catalog.has_table_privilege(m.usesysid, pg_catalog.to_regclass(` + quoteLiteral(table) + `), 'UPDATE') ORDER BY 1)`
}

// staleMark is the SQL for fleetStale, the age of a job that its chosen
// process did not take.
var staleMark = `pg_catalog.now() OPERATOR(pg_catalog.-) '` + strconv.Itoa(int(fleetStale/time.Millisecond)) + ` ms'::pg_catalog.interval`

// check reads every fleet's members and its jobs left behind, and wakes
// the watches that have room for these.
func (c *fleetCheck) check(ctx context.Context) {
	var ihp, custom []*Poller
	for _, p := range c.m.members() {
		switch {
		case p.fleet == nil:
		case p.names.custom():
			custom = append(custom, p)
		default:
			ihp = append(ihp, p)
		}
	}
	if len(ihp)+len(custom) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fleetCheckEvery)
	defer cancel()
	var cols []string
	for _, p := range ihp {
		cols = append(cols, fleetMembersSQL(p.fleet.key, p.names.table.quoted()),
			`(SELECT count(*) FROM (SELECT 1 FROM `+p.names.table.quoted()+` WHERE `+pendingNow+` AND run_at <= `+staleMark+
				` LIMIT `+strconv.Itoa(p.stats.capacity())+`) s)`)
	}
	for _, p := range custom {
		cols = append(cols, fleetMembersSQL(p.fleet.key, p.names.table.quoted()), "0")
	}
	c.m.l.stats.queries.Add(1)
	members := make([][]int32, len(cols)/2)
	stale := make([]int64, len(cols)/2)
	dest := make([]any, 0, len(cols))
	for i := range members {
		dest = append(dest, &members[i], &stale[i])
	}
	if err := c.m.pool.QueryRow(ctx, fleetMembersCTE+` SELECT `+strings.Join(cols, ", "), nil...).Scan(dest...); err != nil {
		return // the polls report the server's trouble
	}
	for i, p := range custom {
		if n, ok := customStale(ctx, p); ok {
			stale[len(ihp)+i] = n
		}
	}
	for i, p := range append(ihp, custom...) {
		p.fleet.members.Store(members[i])
		if stale[i] > 0 {
			p.rescue(stale[i])
		}
	}
}

// customStale counts, for a JobTable other than IHP's, the jobs due for
// fleetStale and still pending (none for a table whose RunAt is NULL).
func customStale(ctx context.Context, p *Poller) (int64, bool) {
	d, err := p.shape.get(ctx, p.pool, p.names)
	if err != nil {
		return 0, false
	}
	where := customWhere(p.names, d, p.opts.queues) + ` AND ` + jobExprs(p.names.job).dueAt + ` <= ` + staleMark
	var n int64
	p.stats.queries.Add(1)
	err = queryPinned(ctx, p.pool, `SELECT count(*) FROM (SELECT 1 FROM `+d.table+` j WHERE `+where+
		` LIMIT `+strconv.Itoa(p.stats.capacity())+`) s`, &n)
	return n, err == nil
}

// rescue wakes the watch for n jobs that the process chosen for them did
// not take, as far as it has room.
func (p *Poller) rescue(n int64) {
	p.post(func() {
		take := min(n, p.fleet.roomFor(p.stats))
		if take > 0 {
			p.fleet.rescues.Add(uint64(take))
			p.stats.wake(take, causeRescue)
		}
	})
}
