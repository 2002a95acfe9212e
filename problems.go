package jobwatch

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// problemLog turns a condition that persists (a table that does not exist,
// a poll that keeps failing, notifications that do not arrive) into few log
// lines: one when it appears, one when it changes, a reminder at most once
// per remind while it lasts, and one when it clears.
type problemLog struct {
	log    *slog.Logger
	remind time.Duration

	mu       sync.Mutex
	key      string // the current problem; "" when there is none
	since    time.Time
	repeats  int // occurrences since the last line
	lastLine time.Time
}

// report records an occurrence of the problem key and logs msg when key is
// new or a reminder is due. It reports whether it logged.
func (p *problemLog) report(level slog.Level, key, msg string, attrs ...any) bool {
	p.mu.Lock()
	now := time.Now()
	if key == p.key && now.Sub(p.lastLine) < p.remind {
		p.repeats++
		p.mu.Unlock()
		return false
	}
	if key != p.key {
		p.since = now
	} else {
		attrs = append(attrs, "since", p.since.Format(time.RFC3339), "repeats", p.repeats)
	}
	p.key, p.repeats, p.lastLine = key, 0, now
	p.mu.Unlock()
	p.log.Log(context.Background(), level, msg, attrs...)
	return true
}

// passing records a brief condition (a lock held for a moment) as report
// does, unless another problem stands: that one is not replaced, and the
// passing one is logged at debug level only, so that the standing problem
// is not said again when it comes back.
func (p *problemLog) passing(level slog.Level, key, msg string, attrs ...any) {
	p.mu.Lock()
	standing := p.key != "" && p.key != key
	p.mu.Unlock()
	if standing {
		p.log.Debug(msg, attrs...)
		return
	}
	p.report(level, key, msg, attrs...)
}

// current returns the problem now, "" when there is none, how often it
// came again since its last line, and when that line was logged.
func (p *problemLog) current() (key string, repeats int, lastLine time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.key, p.repeats, p.lastLine
}

// forget ends the current problem without a word.
func (p *problemLog) forget() {
	p.mu.Lock()
	p.key, p.repeats = "", 0
	p.mu.Unlock()
}

// clear ends the current problem, logging msg at info level when there was
// one.
func (p *problemLog) clear(msg string, attrs ...any) {
	p.mu.Lock()
	had := p.key != ""
	since := p.since
	p.key, p.repeats = "", 0
	p.mu.Unlock()
	if had {
		attrs = append(attrs, "after", time.Since(since).Round(time.Millisecond))
		p.log.Info(msg, attrs...)
	}
}
