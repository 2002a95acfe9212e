package jobwatch

import (
	"context"
	"log/slog"
	"time"
)

// The notify gate, on by default (see WithNotifyGate).
//
// PostgreSQL commits the transactions that NOTIFY one at a time: each
// holds a global lock from just before its commit until after its disk
// flush. With a NOTIFY in every transaction that inserts a job, concurrent
// producers commit in single file. The gate lets one transaction per table
// notify at a time, the one that holds the table's notify key (a
// transaction-level advisory lock) until it ends; the others skip their
// NOTIFY and commit in parallel. The trigger's part is in triggers.sql.
//
// A skipped job is not lost. A skipping transaction holds the skip key in
// shared mode until it ends, so that "a skipper is open" can be seen, and
// bumps the table's skip counter, a sequence, whose value every session
// sees at once, commit or not; it skips only when it can do both without
// waiting, and otherwise notifies. While transactions skip, a watch polls
// gateTrail after each gated notification, reading the gate with its
// count; the poolMonitor of each Listener and pool checks, every
// gateCheckEvery, the gate of every table its watches follow, in one
// query. When the counter moved, or
// a skipper seen open has ended, the watch polls; while one is open it
// looks again, 5ms later, then backing off to gateCheckEvery. So a skipped
// job is woken within gateCheckEvery of its commit whatever the key's
// holder does (stay open for a minute, roll back, die, or belong to
// another role that holds the key for ever), and within a few
// milliseconds under load, where gated notifications come all the time.

// gateColumns are, for the skip key $1 and the table $2 (quoted) with its
// skip counter named $3, whether a skipping transaction is still open (it
// holds the skip key in shared mode, so an exclusive try fails), the
// counter's value (0 before its first skip, or when it does not exist),
// and whether this role may read it (true when there is none). A watch's
// poll reads them with its count.
var gateColumns = gateColumnsOf("$1::int8", "$2::text", "$3::text")

// gateColumnsOf is gateColumns with the skip key, the table and the
// counter given as the SQL expressions key, table and counter; gateCheckSQL
// reads many tables' gates.
func gateColumnsOf(key, table, counter string) string {
	return `g.open, coalesce(g.skips, 0), g.readable FROM (
	SELECT NOT CASE WHEN pg_try_advisory_lock(` + key + `) THEN pg_advisory_unlock(` + key + `) ELSE false END AS open,
	(SELECT CASE WHEN has_sequence_privilege(c.oid, 'SELECT, USAGE') THEN pg_sequence_last_value(c.oid) END
	   FROM pg_class c, pg_class t
	  WHERE t.oid = to_regclass(` + table + `) AND c.relnamespace = t.relnamespace AND c.relname = ` + counter + ` AND c.relkind = 'S') AS skips,
	coalesce((SELECT has_sequence_privilege(c.oid, 'SELECT, USAGE')
	   FROM pg_class c, pg_class t
	  WHERE t.oid = to_regclass(` + table + `) AND c.relnamespace = t.relnamespace AND c.relname = ` + counter + ` AND c.relkind = 'S'), true) AS readable) g`
}

// gateCheckSQL reads the gate of every table in the arrays $1 (skip
// keys), $2 (tables) and $3 (counters), a row each, in order.
const gateCheckSQL = `SELECT NOT CASE WHEN pg_try_advisory_lock(a.key) THEN pg_advisory_unlock(a.key) ELSE false END,
	coalesce(s.skips, 0), coalesce(s.readable, true)
  FROM unnest($1::int8[], $2::text[], $3::text[]) WITH ORDINALITY AS a(key, tbl, counter, i)
  LEFT JOIN LATERAL (
	SELECT CASE WHEN has_sequence_privilege(c.oid, 'SELECT, USAGE') THEN pg_sequence_last_value(c.oid) END AS skips,
	       has_sequence_privilege(c.oid, 'SELECT, USAGE') AS readable
	  FROM pg_class c, pg_class t
	 WHERE t.oid = to_regclass(a.tbl) AND c.relnamespace = t.relnamespace AND c.relname = a.counter AND c.relkind = 'S') s ON true
 ORDER BY a.i`

// How a watch follows the notify gate: it polls gateTrail after a gated
// notification, and again after gateTrail doubling to gateCheckEvery while
// a skipper is open; every gateCheckEvery its Listener checks the skip
// counter for it.
const (
	gateTrail      = 5 * time.Millisecond
	gateCheckEvery = 500 * time.Millisecond
	// gateHot is how long after a skip was last seen gated notifications
	// are followed by a poll.
	gateHot = 2 * time.Second
)

// gateState is what a poller last saw of the gate, the poll loop's own
// but for on, which is set before the poller starts and never changes.
type gateState struct {
	on        bool      // the poller follows the gate (a watch of gated triggers)
	checked   bool      // a check or poll has run
	skips     int64     // the counter then
	open      bool      // a skipper was open then
	blind     bool      // this role may not read the counter
	skippedAt time.Time // the last look that saw the counter move or a skipper open
	trail     backoff
}

// followGate makes the poller follow the notify gate (a watch's poller,
// when the triggers are gated). Call it before start.
func (p *Poller) followGate() {
	p.gate = gateState{on: true, trail: backoff{min: gateTrail, max: gateCheckEvery}}
}

// gateArgs are the arguments of gateColumns.
func (p *Poller) gateArgs() []any {
	return []any{p.names.skipKey, p.names.table.quoted(), p.names.counter}
}

// gateSoon asks for a poll gateTrail from now: a gated notification came
// while transactions skip (the last looks saw skips, or a skipper open).
// Not at once: the wake-up it sent has a worker fetching now, and the
// skippers behind the notifier are committing. When nothing has skipped
// for gateHot, nothing is asked: a lone producer's notifications cost no
// query beyond the workers' fetches, and a first skip is found by the
// periodic check (gateCheck), which makes the gate hot.
func (p *Poller) gateSoon() {
	if !p.gate.on {
		return
	}
	p.post(func() {
		now := time.Now()
		if p.gate.open || now.Sub(p.gate.skippedAt) < gateHot {
			earlier(&p.sched.trailAt, now.Add(gateTrail))
		}
	})
}

// gateChecked takes the periodic check of this poller's gate, and polls
// when it calls for one.
func (p *Poller) gateChecked(open bool, skips int64, readable bool) {
	p.post(func() {
		// In a fleet, the process chosen for the counter's value polls.
		if p.gateSeen(open, skips, readable) && p.fleet.chosenFor(uint64(skips)) {
			p.sched.gateNow = true
		}
	})
}

// gateSeen records what a check or a poll saw of the gate and reports
// whether a poll is called for: the counter moved (a skip happened since)
// or a skipper was open last time (it may have committed since; while one
// stays open every look polls, so that the others' jobs are not held up
// by it). While one is open it asks for a poll after the trail delay. A
// counter this role may not read leaves skipped jobs to the polls: that is
// said once, and the watch polls at its fallback interval meanwhile. The
// loop calls it.
func (p *Poller) gateSeen(open bool, skips int64, readable bool) bool {
	g := &p.gate
	switch {
	case !readable && !g.blind:
		p.gateProblems.report(slog.LevelError, "gate blind",
			"jobwatch: cannot read the notify gate's skip counter: jobs whose transactions skipped their NOTIFY are found by polling every fallback interval. "+
				"Fix: GRANT SELECT ON SEQUENCE to this role, or install the triggers WithNotifyGate(false)",
			"table", p.names.table.raw, "counter", p.names.counter)
	case readable && g.blind:
		p.gateProblems.clear("jobwatch: the notify gate's skip counter can be read again", "table", p.names.table.raw)
	}
	g.blind = !readable
	poll := g.open || (g.checked && skips != g.skips)
	now := time.Now()
	if poll || open {
		g.skippedAt = now
	}
	g.checked, g.skips, g.open = true, skips, open
	if open {
		earlier(&p.sched.trailAt, now.Add(g.trail.delay()))
	} else {
		g.trail.reset()
	}
	return poll
}

// gateCheck is the periodic look at the gates of the tables followed by
// the watches a poolMonitor serves: one query for all of them every
// gateCheckEvery, none when no watch follows a gate. Every table is looked
// at each time, whatever its watch's own polls saw meanwhile, so that no
// skip waits longer than gateCheckEvery and a query.
type gateCheck struct {
	m      *poolMonitor
	cancel context.CancelFunc
	done   chan struct{}
}

func startGateCheck(m *poolMonitor) *gateCheck {
	ctx, cancel := context.WithCancel(context.Background())
	c := &gateCheck{m: m, cancel: cancel, done: make(chan struct{})}
	go c.run(ctx)
	return c
}

func (c *gateCheck) stop() {
	if c != nil {
		c.cancel()
		<-c.done
	}
}

func (c *gateCheck) run(ctx context.Context) {
	defer close(c.done)
	t := time.NewTicker(gateCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.check(ctx)
	}
}

// check looks at the gate of every poller that follows one at once.
func (c *gateCheck) check(ctx context.Context) {
	var due []*Poller
	var keys []int64
	var tables, counters []string
	for _, p := range c.m.members() {
		if p.gate.on {
			due = append(due, p)
			keys = append(keys, p.names.skipKey)
			tables = append(tables, p.names.table.quoted())
			counters = append(counters, p.names.counter)
		}
	}
	if len(due) == 0 {
		return
	}
	// Not cut short by stop: pgx would discard the pool's connection.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), gateCheckEvery)
	defer cancel()
	c.m.l.stats.queries.Add(1) // counted with the Listener's checks
	rows, err := c.m.pool.Query(ctx, gateCheckSQL, keys, tables, counters)
	if err != nil {
		return // the polls report the server's trouble
	}
	defer rows.Close()
	for i := 0; rows.Next() && i < len(due); i++ {
		var open, readable bool
		var skips int64
		if rows.Scan(&open, &skips, &readable) != nil {
			return
		}
		due[i].gateChecked(open, skips, readable)
	}
}
