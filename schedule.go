package jobwatch

import "time"

// schedule decides when a poller polls: the interval's polls (plus jitter,
// or every fallback while the watch is degraded), the moment the earliest
// job scheduled for later is due, polls asked for now, and the polls that
// trail a gated notification. It is a plain value, with no clock and no
// queries of its own: the poller changes it under its lock and asks step
// what is due.
type schedule struct {
	interval time.Duration
	jitter   func() time.Duration

	nextInterval time.Time // the next interval poll; zero: at once
	lastInterval time.Time // when the last one ran; zero before the first
	pollNow      bool
	gateNow      bool      // a poll now, called for by the notify gate's check
	scheduled    time.Time // the earliest known future job is due; zero if none
	trailAt      time.Time // a poll behind the notify gate; zero if none
	recheckAt    time.Time // WithClockSkew's next poll; zero if none
}

// step is what is due at one moment.
type step struct {
	poll      bool      // poll now
	interval  bool      // it is the interval's poll (the repair check follows it)
	trailOnly bool      // called for only behind the gate: it wakes workers only for what skipped
	recheck   bool      // called for only by WithClockSkew: it opens no new window of rechecks
	cause     wakeCause // for a poll: what its wake-ups count as
	wakeAt    time.Time // when to step again, unless the schedule changes sooner
}

// step says what is due at now, with the interval shortened to fallback
// while that is positive and shorter, and marks it done.
func (s *schedule) step(now time.Time, fallback time.Duration) step {
	degraded := fallback > 0 && fallback < s.interval
	if degraded && !s.lastInterval.IsZero() {
		if t := s.lastInterval.Add(fallback); t.Before(s.nextInterval) {
			s.nextInterval = t
		}
	}
	reached := func(t time.Time) bool { return !t.IsZero() && !now.Before(t) }
	var st step
	st.interval = !now.Before(s.nextInterval)
	st.poll = s.pollNow || s.gateNow || st.interval || reached(s.scheduled) || reached(s.trailAt) || reached(s.recheckAt)
	st.trailOnly = reached(s.trailAt) && !s.pollNow && !s.gateNow && !st.interval && !reached(s.scheduled) && !reached(s.recheckAt)
	st.recheck = reached(s.recheckAt) && !s.pollNow && !s.gateNow && !st.interval && !reached(s.scheduled) && !reached(s.trailAt)
	if st.poll {
		switch {
		case s.pollNow || st.interval:
			st.cause = causePoll
		case reached(s.scheduled), reached(s.recheckAt):
			st.cause = causeScheduled
		default:
			st.cause = causeGate
		}
		s.pollNow, s.gateNow = false, false
		for _, t := range []*time.Time{&s.scheduled, &s.trailAt, &s.recheckAt} {
			if reached(*t) {
				*t = time.Time{}
			}
		}
	}
	if st.interval {
		s.lastInterval = now
		if degraded {
			s.nextInterval = now.Add(fallback)
		} else {
			s.nextInterval = now.Add(s.interval + s.jitter())
		}
	}
	st.wakeAt = s.nextInterval
	for _, t := range []time.Time{s.scheduled, s.trailAt, s.recheckAt} {
		if !t.IsZero() && t.Before(st.wakeAt) {
			st.wakeAt = t
		}
	}
	return st
}

// earlier sets *t, one of the schedule's times, to at unless it is set
// sooner already, and reports whether it changed.
func earlier(t *time.Time, at time.Time) bool {
	if !t.IsZero() && !at.Before(*t) {
		return false
	}
	*t = at
	return true
}

// backoff is a delay that doubles from min to max.
type backoff struct {
	min, max time.Duration
	next     time.Duration
}

// delay returns the next delay and doubles the one after.
func (b *backoff) delay() time.Duration {
	if b.next == 0 {
		b.next = b.min
	}
	d := b.next
	b.next = min(2*b.next, b.max)
	return d
}

func (b *backoff) reset() { b.next = 0 }
