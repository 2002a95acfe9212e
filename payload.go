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
// A gated trigger (WithNotifyGate) puts "g:" before each, and every
// trigger puts "x:<xid> " first: the notifying transaction's id, the same
// for every watch that receives it, which WithFleet ranks processes by. A
// busy process of a fleet passes a wake-up on with "x:<xid> f:<rank> "
// before "due:<n>". For a JobTable
// with a Queue column, " q:<queue>" after "due:<n>" or "at:<epoch>" names
// the queue of the jobs announced (the rest of the payload, whatever it
// holds). Any payload wakes an IHP worker, which ignores it.
const (
	payloadDue   = "due:"
	payloadAt    = "at:"
	payloadPoll  = "poll"
	payloadGated = "g:"
	payloadQueue = " q:"
	payloadKey   = "x:"
	payloadHop   = "f:"
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
	// Key is the notifying transaction's id ("x:<xid>"), which every
	// receiver sees alike; 0 when the payload has none (IHP's triggers,
	// or jobwatch's before WithFleet).
	Key uint64
	// Hop is, for a wake-up passed on by a busy process of a fleet
	// (WithFleet), the rank of the process it is passed to; 0 otherwise.
	Hop int
}

// ParsePayload decodes a notification payload sent on a table's channel
// (see CreateNotificationTriggerSQL). Anything it does not know counts as
// one due job, as IHP's empty payload does.
func ParsePayload(p string) Payload {
	var out Payload
	out.Key, out.Hop, p = cutKey(p)
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

// cutKey takes "x:<key> " and then "f:<hop> " off the front of p; a
// malformed key leaves p as it is.
func cutKey(p string) (key uint64, hop int, rest string) {
	k, ok := strings.CutPrefix(p, payloadKey)
	if !ok {
		return 0, 0, p
	}
	digits, after, ok := strings.Cut(k, " ")
	n, err := strconv.ParseUint(digits, 10, 64)
	if !ok || err != nil || n == 0 {
		return 0, 0, p
	}
	if h, more, ok := strings.Cut(after, " "); ok && strings.HasPrefix(h, payloadHop) {
		if r, err := strconv.Atoi(h[len(payloadHop):]); err == nil && r > 0 && r <= maxHop {
			return n, r, more
		}
	}
	return n, 0, after
}

// maxHop bounds the ranks a wake-up is passed along: a payload naming a
// larger one was not sent by a fleet.
const maxHop = 1 << 16

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
