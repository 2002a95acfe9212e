package jobwatch

import (
	"testing"
	"time"
)

// TestScheduleStep runs the poll schedule through its cases without a
// database or a clock: each case sets the schedule up, steps at a time,
// and says what must be due and when to look again.
func TestScheduleStep(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	fresh := func() schedule {
		return schedule{interval: time.Minute, jitter: func() time.Duration { return 2 * time.Second }}
	}
	for _, c := range []struct {
		name     string
		setup    func(*schedule)
		now      time.Time
		fallback time.Duration
		want     step
	}{
		{"first step polls at once", func(*schedule) {}, t0, 0,
			step{poll: true, interval: true, cause: causePoll, wakeAt: at(time.Minute + 2*time.Second)}},
		{"between intervals: wait for the next", func(s *schedule) { s.nextInterval = at(time.Minute) }, at(time.Second), 0,
			step{wakeAt: at(time.Minute)}},
		{"a job due later wakes sooner", func(s *schedule) {
			s.nextInterval, s.scheduled = at(time.Minute), at(10*time.Second)
		}, at(time.Second), 0, step{wakeAt: at(10 * time.Second)}},
		{"the job's moment comes: poll, not an interval poll", func(s *schedule) {
			s.nextInterval, s.scheduled = at(time.Minute), at(10*time.Second)
		}, at(10 * time.Second), 0, step{poll: true, cause: causeScheduled, wakeAt: at(time.Minute)}},
		{"asked for now", func(s *schedule) { s.nextInterval, s.pollNow = at(time.Minute), true }, at(time.Second), 0,
			step{poll: true, cause: causePoll, wakeAt: at(time.Minute)}},
		{"called for by the gate's check", func(s *schedule) { s.nextInterval, s.gateNow = at(time.Minute), true }, at(time.Second), 0,
			step{poll: true, cause: causeGate, wakeAt: at(time.Minute)}},
		{"behind the gate only: trailing", func(s *schedule) { s.nextInterval, s.trailAt = at(time.Minute), at(5*time.Millisecond) },
			at(5 * time.Millisecond), 0, step{poll: true, trailOnly: true, cause: causeGate, wakeAt: at(time.Minute)}},
		{"behind the gate and asked for: a full poll", func(s *schedule) {
			s.nextInterval, s.trailAt, s.pollNow = at(time.Minute), at(5*time.Millisecond), true
		}, at(5 * time.Millisecond), 0, step{poll: true, cause: causePoll, wakeAt: at(time.Minute)}},
		{"degraded: the fallback shortens the wait from the last interval poll", func(s *schedule) {
			s.lastInterval, s.nextInterval = t0, at(time.Minute)
		}, at(100 * time.Millisecond), time.Second, step{wakeAt: at(time.Second)}},
		{"degraded: polls every fallback, no jitter", func(s *schedule) {
			s.lastInterval, s.nextInterval = t0, at(time.Second)
		}, at(time.Second), time.Second, step{poll: true, interval: true, cause: causePoll, wakeAt: at(2 * time.Second)}},
		{"a fallback longer than the interval changes nothing", func(s *schedule) {
			s.lastInterval, s.nextInterval = t0, at(time.Minute)
		}, at(time.Second), time.Hour, step{wakeAt: at(time.Minute)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := fresh()
			c.setup(&s)
			if got := s.step(c.now, c.fallback); got != c.want {
				t.Fatalf("step = %+v, want %+v", got, c.want)
			}
		})
	}
}

// TestScheduleStepClears: what a step made due is done; asking again at
// the same moment finds nothing due.
func TestScheduleStepClears(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	s := schedule{interval: time.Minute, jitter: func() time.Duration { return 0 },
		pollNow: true, scheduled: t0, trailAt: t0}
	if st := s.step(t0, 0); !st.poll || !st.interval {
		t.Fatalf("first step %+v: want the interval poll", st)
	}
	if st := s.step(t0, 0); st.poll {
		t.Fatalf("second step %+v: nothing is due any more", st)
	}
	if !s.scheduled.IsZero() || !s.trailAt.IsZero() || s.pollNow {
		t.Fatalf("left due: %+v", s)
	}
}

func TestEarlier(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	var at time.Time
	if !earlier(&at, t0) || !at.Equal(t0) {
		t.Fatal("unset: set")
	}
	if earlier(&at, t0.Add(time.Second)) || !at.Equal(t0) {
		t.Fatal("later: kept")
	}
	if !earlier(&at, t0.Add(-time.Second)) || !at.Equal(t0.Add(-time.Second)) {
		t.Fatal("sooner: set")
	}
}

// TestClockSkewRechecksEnd: WithClockSkew's rechecks of a job that stays
// due (a worker holds it) end with their window: a recheck's finding
// never opens a new one.
func TestClockSkewRechecksEnd(t *testing.T) {
	p := &Poller{opts: options{clockSkew: 200 * time.Millisecond}, recheck: backoff{min: recheckFirst, max: 200 * time.Millisecond}}
	p.wokeFor(1, false) // a notification's wake-up
	rechecks := 0
	for !p.sched.recheckAt.IsZero() {
		if rechecks++; rechecks > 10 {
			t.Fatal("rechecks go on")
		}
		time.Sleep(time.Until(p.sched.recheckAt)) // as the loop waits for it
		p.sched.recheckAt = time.Time{}
		p.wokeFor(1, true) // the job is still due
	}
	if rechecks < 2 {
		t.Fatalf("%d rechecks", rechecks)
	}
}
