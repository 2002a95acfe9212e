package jobwatch

import (
	"math"
	"strconv"
	"strings"
	"time"
)

// Notification payloads sent by the triggers on a table's channel:
//
//	""            one job is due now (IHP's triggers send this too)
//	"due:<n>"     n jobs became due in one statement (n counted up to 1000)
//	"at:<epoch>"  the earliest job of a statement is due at this server
//	              time, in seconds since 1970
//	"poll"        look at the table: a transaction past its bound of
//	              notifications, or a partition's row trigger
//
// A gated trigger (WithNotifyGate) puts "g:" before each. For a JobTable
// with a Queue column, " q:<queue>" after "due:<n>" or "at:<epoch>" names
// the queue of the jobs announced (the rest of the payload, whatever it
// holds). Any payload wakes an IHP worker, which ignores it.
const (
	payloadDue   = "due:"
	payloadAt    = "at:"
	payloadPoll  = "poll"
	payloadGated = "g:"
	payloadQueue = " q:"
)

// maxDueCount caps the count of due rows a statement's notification
// carries: no watcher wakes more workers than that.
const maxDueCount = 1000

// maxAnnouncements bounds the notifications with a payload of their own
// ("due:<n>", "at:<epoch>") that one transaction sends on a channel;
// PostgreSQL merges identical ones, so "" and "poll" need no bound.
const maxAnnouncements = 4

// maxTimestampSeconds is about the latest time PostgreSQL's timestamps
// hold (294276 AD), in seconds since 1970: a payload time beyond it was
// not sent by a trigger.
const maxTimestampSeconds = 9.2e12

// unixSeconds converts seconds since 1970, finite and within
// ±maxTimestampSeconds, to a time.
func unixSeconds(secs float64) time.Time {
	whole := math.Floor(secs)
	return time.Unix(int64(whole), int64((secs-whole)*1e9))
}

// seconds converts a number of seconds to a Duration, saturating at
// ±9e9 seconds (285 years, just short of the largest Duration) instead of
// overflowing; NaN is 0.
func seconds(secs float64) time.Duration {
	const limit = 9e9
	switch {
	case math.IsNaN(secs):
		return 0
	case secs >= limit:
		return limit * time.Second
	case secs <= -limit:
		return -limit * time.Second
	}
	return time.Duration(secs * float64(time.Second))
}

// Payload is a notification payload of jobwatch's triggers, decoded.
type Payload struct {
	Due   int64     // jobs due now: n for "due:<n>", 1 for "" (and anything unknown); 0 otherwise
	At    time.Time // for "at:<epoch>": when the earliest job scheduled for later is due, on the server's clock
	Poll  bool      // "poll": look at the table
	Gated bool      // sent by a gated trigger (WithNotifyGate)
	// Queued says that the payload names the queue of its jobs, Queue
	// (which may be ""): a JobTable with a Queue column (see WithQueues).
	Queued bool
	Queue  string
}

// ParsePayload decodes a notification payload sent on a table's channel
// (see CreateNotificationTriggerSQL). Anything it does not know counts as
// one due job, as IHP's empty payload does.
func ParsePayload(p string) Payload {
	var out Payload
	if rest, ok := strings.CutPrefix(p, payloadGated); ok {
		p, out.Gated = rest, true
	}
	if i := strings.Index(p, payloadQueue); i > 0 && !strings.ContainsRune(p[:i], ' ') {
		p, out.Queue, out.Queued = p[:i], p[i+len(payloadQueue):], true
	}
	switch {
	case p == payloadPoll:
		out.Poll = true
		return out
	case strings.HasPrefix(p, payloadDue):
		if n, err := strconv.ParseInt(p[len(payloadDue):], 10, 64); err == nil && n > 0 {
			out.Due = n
			return out
		}
	case strings.HasPrefix(p, payloadAt):
		if secs, err := strconv.ParseFloat(p[len(payloadAt):], 64); err == nil && secs > 0 && secs <= maxTimestampSeconds {
			out.At = unixSeconds(secs)
			return out
		}
	}
	out.Due = 1
	return out
}

// String says what the payload announces, in words.
func (p Payload) String() string {
	var s string
	switch {
	case p.Poll:
		s = "look at the table"
	case !p.At.IsZero():
		s = "next job due at " + p.At.UTC().Format(time.RFC3339Nano)
	case p.Due == 1:
		s = "1 job due"
	default:
		s = strconv.FormatInt(p.Due, 10) + " jobs due"
	}
	if p.Queued {
		s += " in queue " + strconv.Quote(p.Queue)
	}
	if p.Gated {
		s += " (gated)"
	}
	return s
}
