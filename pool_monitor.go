package jobwatch

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// poolMonitor serves the watches that share one Listener and one pool. It
// owns whether notifications sent through that pool reach the Listener
// (the delivery check's finding: the one place that fact lives), and runs
// the checks made once for all those watches: the delivery check and the
// notify gate's check. The Listener knows nothing of it: the monitor
// follows the connection state the Listener publishes (connection) and
// its closing, and the delivery check receives its probes through an
// ordinary subscription.
type poolMonitor struct {
	l        *Listener
	pool     *pgxpool.Pool
	problems problemLog
	delivery *deliveryCheck // nil with the check off
	cancel   context.CancelFunc
	done     chan struct{} // closed when follow has returned

	mu        sync.Mutex
	pollers   map[*Poller]bool // the watches' pollers
	gate      *gateCheck       // started by the first poller that follows a gate
	fleet     *fleetCheck      // started by the first poller in a fleet
	working   bool
	changedAt time.Time
}

// monitors are the running monitors, by Listener and pool.
var monitors = struct {
	sync.Mutex
	m map[monitorKey]*poolMonitor
}{m: map[monitorKey]*poolMonitor{}}

type monitorKey struct {
	l    *Listener
	pool *pgxpool.Pool
}

// joinMonitor adds p, a watch's poller, to the monitor of l and pool,
// starting it for the first, and returns it; nil when l is closed.
func joinMonitor(l *Listener, pool *pgxpool.Pool, p *Poller) *poolMonitor {
	monitors.Lock()
	defer monitors.Unlock()
	if l.isClosed() {
		return nil
	}
	k := monitorKey{l, pool}
	m := monitors.m[k]
	if m == nil {
		m = startMonitor(l, pool)
		monitors.m[k] = m
	}
	m.mu.Lock()
	m.pollers[p] = true
	if m.gate == nil && p.gate.on {
		m.gate = startGateCheck(m)
	}
	if m.fleet == nil && p.fleet != nil {
		m.fleet = startFleetCheck(m)
	}
	m.mu.Unlock()
	return m
}

func startMonitor(l *Listener, pool *pgxpool.Pool) *poolMonitor {
	ctx, cancel := context.WithCancel(context.Background())
	m := &poolMonitor{
		l: l, pool: pool, problems: problemLog{log: l.log, remind: deliveryRemind},
		cancel: cancel, done: make(chan struct{}),
		pollers: map[*Poller]bool{}, working: true, changedAt: time.Now(),
	}
	if l.opts.deliveryInterval > 0 {
		m.delivery = startDeliveryCheck(ctx, l, pool, m.set)
	}
	go m.follow(ctx)
	return m
}

// leave removes p; the last poller to leave stops the monitor.
func (m *poolMonitor) leave(p *Poller) {
	if m == nil {
		return
	}
	monitors.Lock()
	m.mu.Lock()
	delete(m.pollers, p)
	last := len(m.pollers) == 0
	gate, fleet := m.gate, m.fleet
	m.mu.Unlock()
	if k := (monitorKey{m.l, m.pool}); last && monitors.m[k] == m {
		delete(monitors.m, k)
	}
	monitors.Unlock()
	if last {
		m.cancel()
		<-m.done
		m.delivery.stop()
		gate.stop()
		fleet.stop()
	}
}

// members returns the pollers of the watches served.
func (m *poolMonitor) members() []*Poller {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*Poller, 0, len(m.pollers))
	for p := range m.pollers {
		out = append(out, p)
	}
	return out
}

// follow follows the Listener's connection: when it goes, the delivery
// check looks at once whether the pool still reaches a server; when the
// Listener is closed, the check is stopped and notifications no longer
// arrive, for good.
func (m *poolMonitor) follow(ctx context.Context) {
	defer close(m.done)
	up := false
	for {
		st, changed := m.l.connection()
		if up && !st.up {
			m.delivery.nudge()
		}
		up = st.up
		select {
		case <-changed:
		case <-ctx.Done():
			return
		case <-m.l.closing():
			m.delivery.stop() // its last finding before this one
			m.set(false, "the Listener was closed while watches still use it (close the watches first)")
			<-ctx.Done()
			return
		}
	}
}

// state returns whether notifications arrive and since when that holds.
// A poller reads it whenever it plans, so no change is ever lost.
func (m *poolMonitor) state() (bool, time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.working, m.changedAt
}

// set records whether notifications arrive and, on a change, logs it once
// and has every poller plan again. The line is logged first, so that
// whoever sees the new state finds it logged; the pollers are told after
// the state is stored, and each reads it when it plans, so that one
// joining meanwhile cannot keep the old one. The delivery check calls it,
// and follow once the check has stopped: one writer at a time.
func (m *poolMonitor) set(working bool, cause string) {
	if working {
		m.problems.clear("jobwatch: notifications arrive again; polling at the normal interval")
	} else {
		fallback := defaultFallbackPoll
		if ps := m.members(); len(ps) > 0 {
			fallback = ps[0].fallback
		}
		m.problems.report(slog.LevelError, cause,
			"jobwatch: notifications do not reach the Listener: jobs are found by polling every fallback interval until they do",
			"cause", cause, "fallback_poll", fallback)
	}
	m.mu.Lock()
	changed := m.working != working
	if changed {
		m.working, m.changedAt = working, time.Now()
	}
	m.mu.Unlock()
	if changed {
		for _, p := range m.members() {
			p.signal()
		}
	}
}
