package jobwatch

import (
	"context"
	"fmt"
	"maps"

	"github.com/jackc/pgx/v5"
)

// Presence: a Listener can show other sessions that it is connected, by
// holding on its connection the session advisory lock (key, the backend's
// own pid), which pg_locks shows to every session and which ends with the
// session, however the process behind it dies. The fleet (WithFleet)
// counts its members so. The pid in the lock is what makes it the
// Listener's own: another session can take (key, some pid) but never as
// that pid's backend.

// presenceSQL and absenceSQL take and release the lock of the key $1.
const (
	presenceSQL = `SELECT pg_catalog.pg_try_advisory_lock($1::int4, pg_catalog.pg_backend_pid())`
	absenceSQL  = `SELECT pg_catalog.pg_advisory_unlock($1::int4, pg_catalog.pg_backend_pid())`
)

// present has the Listener hold key's presence lock whenever it is
// connected, from its next turn on, until remove is called; several users
// of one key share the lock. The connection state (connection) says when
// it is held, or refused because another session holds it.
func (l *Listener) present(key int32) (remove func()) {
	l.mu.Lock()
	if l.presence == nil {
		l.presence = map[int32]int{}
	}
	l.presence[key]++
	l.pending, l.presenceChanged = true, true
	l.wakeLoop()
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		if l.presence[key]--; l.presence[key] <= 0 {
			delete(l.presence, key)
		}
		l.pending, l.presenceChanged = true, true
		l.wakeLoop()
		l.mu.Unlock()
	}
}

// applyPresence takes the presence locks wanted and not held, and releases
// those held and no longer wanted. A key refused is tried again on the
// next connection. The connection loop calls it.
func (l *Listener) applyPresence(conn *pgx.Conn) error {
	l.mu.Lock()
	if !l.presenceChanged {
		l.mu.Unlock()
		return nil
	}
	l.presenceChanged = false
	want := maps.Clone(l.presence)
	st := l.state
	l.mu.Unlock()
	held, refused := maps.Clone(st.present), maps.Clone(st.refused)
	if held == nil {
		held = map[int32]bool{}
	}
	if refused == nil {
		refused = map[int32]bool{}
	}
	changed := false
	ctx, cancel := context.WithTimeout(l.ctx, connectTimeout)
	defer cancel()
	for key := range want {
		if held[key] || refused[key] {
			continue
		}
		var ok bool
		if err := conn.QueryRow(ctx, presenceSQL, key).Scan(&ok); err != nil {
			return fmt.Errorf("listener: presence %d: %w", key, err)
		}
		l.stats.queries.Add(1)
		if ok {
			held[key] = true
		} else {
			refused[key] = true
		}
		changed = true
	}
	for key := range held {
		if _, ok := want[key]; ok {
			continue
		}
		if _, err := conn.Exec(ctx, absenceSQL, key); err != nil {
			return fmt.Errorf("listener: presence %d: %w", key, err)
		}
		l.stats.queries.Add(1)
		delete(held, key)
		changed = true
	}
	for key := range refused {
		if _, ok := want[key]; !ok {
			delete(refused, key)
			changed = true
		}
	}
	if changed {
		l.setState(func(s *connState) { s.present, s.refused = held, refused })
	}
	return nil
}
