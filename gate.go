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

// The gate's advisory lock keys: the first int4 of each, the second being
// hashtext(channel).
const (
	gateNotifyKey = "hashtext('jobwatch notify')"
	gateSkipKey   = "hashtext('jobwatch skip')"
)

// gateStatementSQL is the part of the statement trigger's body that makes
// a transaction skip its NOTIFY when another one holds the notify key.
// An INSERT takes part at once, before it looks at its rows: nearly every
// INSERT into a job table adds a pending job, and this keeps a skipper's
// cost to a few function calls, evaluated without starting the executor.
func gateStatementSQL(channelLiteral, counterLiteral string) string {
	return `
    IF NOT pg_try_advisory_xact_lock(` + gateNotifyKey + `, hashtext(` + channelLiteral + `)) THEN
        -- Another open transaction holds the notify key and notifies when
        -- it ends. Skip, and say so (see Poller): the skip key, held until
        -- this transaction ends, and the skip counter.
        -- Written as conditions and an assignment, not PERFORM: PL/pgSQL
        -- evaluates those without starting the executor, the greater part
        -- of a skipper's cost. The try fails only while a watch holds the
        -- skip key for an instant (see gateColumns): then wait for it.
        IF NOT pg_try_advisory_xact_lock_shared(` + gateSkipKey + `, hashtext(` + channelLiteral + `)) THEN
            PERFORM pg_advisory_xact_lock_shared(` + gateSkipKey + `, hashtext(` + channelLiteral + `));
        END IF;
        skips := CASE WHEN to_regclass(` + counterLiteral + `) IS NOT NULL THEN nextval(to_regclass(` + counterLiteral + `)) END;
        RETURN NULL;
    END IF;`
}

// gateColumns are, for the channel $1 and the skip counter $2 (a name),
// whether a skipping transaction is still open (it holds the skip key in
// shared mode, so an exclusive try fails) and the counter's value (0
// before its first skip, or when it does not exist). A watch's poll reads
// them with its count; gateCheckSQL reads them alone.
const gateColumns = `NOT CASE WHEN pg_try_advisory_lock(` + gateSkipKey + `, hashtext($1))
	THEN pg_advisory_unlock(` + gateSkipKey + `, hashtext($1)) ELSE false END,
	coalesce(pg_sequence_last_value(to_regclass($2)), 0)`

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
	on      bool   // the poller follows the gate (a watch of gated triggers)
	counter string // the skip counter's name
	checked bool   // a check or poll has run
	skips   int64  // the counter then
	open    bool   // a skipper was open then
	trail   backoff
}

// followGate makes the poller follow the notify gate (a watch's poller,
// when the triggers are gated). Call it before start.
func (p *Poller) followGate() {
	p.gate = gateState{on: true, counter: p.names.table.qualify(p.names.counter),
		trail: backoff{min: gateTrail, max: gateCheckEvery}}
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
	var open bool
	var skips int64
	err := p.pool.QueryRow(ctx, gateCheckSQL, p.names.channel, p.gate.counter).Scan(&open, &skips)
	p.setEarlier(&p.gateAt, time.Now().Add(gateCheckEvery))
	if err != nil {
		return false // the poll, if one comes, reports the server's trouble
	}
	return p.gateSeen(open, skips)
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
