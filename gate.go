package jobwatch

import (
	"context"
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
// NOTIFY and commit in parallel.
//
// A skipped job is not lost. A skipping transaction holds the skip key in
// shared mode until it ends, so that "a skipper is open" can be seen, and
// bumps the table's skip counter, a sequence, whose value every session
// sees at once, commit or not. A watch checks the counter after each gated
// notification and every gateCheckEvery besides; when it moved, or when a
// skipper it saw open has ended, it polls; while a skipper is open it
// checks again, 5ms later, then backing off to gateCheckEvery. So a skipped
// job is woken within gateCheckEvery of its commit whatever the key's
// holder does (stay open for a minute, roll back, die), and within a few
// milliseconds under load, where gated notifications come all the time.

// The gate's part of the statement trigger's body is in triggers.sql: an
// INSERT that fails to take the table's notify key (names.notifyKey) takes
// the skip key (names.skipKey) in shared mode and bumps the skip counter,
// each only when it can without waiting; otherwise it notifies.

// gateColumns are, for the skip key $1 and the table $2 (quoted) with its
// skip counter named $3, whether a skipping transaction is still open (it
// holds the skip key in shared mode, so an exclusive try fails), the
// counter's value (0 before its first skip, or when it does not exist),
// and whether this role may read it. A watch's poll reads them with its
// count; gateCheckSQL reads them alone.
const gateColumns = `NOT CASE WHEN pg_try_advisory_lock($1::int8) THEN pg_advisory_unlock($1::int8) ELSE false END,
	coalesce((SELECT CASE WHEN has_sequence_privilege(c.oid, 'SELECT, USAGE') THEN pg_sequence_last_value(c.oid) END
	            FROM pg_class c, pg_class t
	           WHERE t.oid = to_regclass($2::text) AND c.relnamespace = t.relnamespace AND c.relname = $3::text AND c.relkind = 'S'), 0),
	coalesce((SELECT has_sequence_privilege(c.oid, 'SELECT, USAGE')
	            FROM pg_class c, pg_class t
	           WHERE t.oid = to_regclass($2::text) AND c.relnamespace = t.relnamespace AND c.relname = $3::text AND c.relkind = 'S'), true)`

const gateCheckSQL = `SELECT ` + gateColumns

// How a watch follows the notify gate: it polls gateTrail
// after a gated notification, and again after gateTrail doubling to
// gateCheckEvery while a skipper is open; every gateCheckEvery besides it
// checks the skip counter, and polls when it moved.
const (
	gateTrail      = 5 * time.Millisecond
	gateCheckEvery = 500 * time.Millisecond
)

// gateState is what the poller last saw of the gate.
type gateState struct {
	on      bool  // the poller follows the gate (a watch of gated triggers)
	checked bool  // a check or poll has run
	skips   int64 // the counter then
	open    bool  // a skipper was open then
	trail   backoff
}

// followGate makes the poller follow the notify gate (a watch's poller,
// when the triggers are gated). Call it before start.
func (p *Poller) followGate() {
	p.gate = gateState{on: true, trail: backoff{min: gateTrail, max: gateCheckEvery}}
	p.gateAt = time.Now()
}

// gateSoon asks for a poll gateTrail from now: a gated notification came.
// Not at once: the wake-up it sent has a worker fetching now, and the
// skippers behind the notifier are committing.
func (p *Poller) gateSoon() {
	if p.gate.on {
		p.setEarlier(&p.trailAt, time.Now().Add(gateTrail))
	}
}

// checkGate is the light check: it reads the skip counter and whether a
// skipper is open, sets the next check, and reports whether to poll.
func (p *Poller) checkGate(ctx context.Context) bool {
	var open, readable bool
	var skips int64
	err := p.pool.QueryRow(ctx, gateCheckSQL, p.gateArgs()...).Scan(&open, &skips, &readable)
	p.setEarlier(&p.gateAt, time.Now().Add(gateCheckEvery))
	if err != nil {
		return false // the poll, if one comes, reports the server's trouble
	}
	return p.gateSeen(open, skips)
}

// gateArgs are the arguments of gateColumns.
func (p *Poller) gateArgs() []any {
	return []any{p.names.skipKey, p.names.table.quoted(), p.names.counter}
}

// gateSeen records what a check or a poll saw of the gate and reports
// whether a poll is called for: the counter moved (a skip happened since)
// or a skipper was open last time (it may have committed since; while one
// stays open every look polls, so that the others' jobs are not held up
// by it). While one is open it asks for a poll after the trail delay.
func (p *Poller) gateSeen(open bool, skips int64) bool {
	g := &p.gate
	poll := g.open || (g.checked && skips != g.skips)
	g.checked, g.skips, g.open = true, skips, open
	if open {
		p.setEarlier(&p.trailAt, time.Now().Add(g.trail.delay()))
	} else {
		g.trail.reset()
	}
	return poll
}
