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
// A gated trigger (WithNotifyGate) puts "g:" before each. Any payload wakes
// an IHP worker, which ignores it.
const (
	payloadDue   = "due:"
	payloadAt    = "at:"
	payloadPoll  = "poll"
	payloadGated = "g:"
	// payloadIn is the relative form ("in:<seconds>") that triggers
	// installed by earlier versions send until they are updated.
	payloadIn = "in:"
)

// maxDueCount caps the count of due rows a statement's notification
// carries: no watcher wakes more workers than that.
const maxDueCount = 1000

// maxAnnouncements bounds the notifications with a payload of their own
// ("due:<n>", "at:<epoch>") that one transaction sends on a channel;
// PostgreSQL merges identical ones, so "" and "poll" need no bound.
const maxAnnouncements = 4

// payload is a notification payload as a watch reads it.
type payload struct {
	due   int64     // jobs due now; 0 when none is announced
	at    time.Time // when the earliest future job is due, on the server's clock; zero if none
	in    time.Duration
	poll  bool // look at the table
	gated bool
}

// parsePayload reads a notification payload. Anything it does not know
// counts as one due job, as IHP's empty payload does.
func parsePayload(p string) payload {
	var out payload
	if rest, ok := strings.CutPrefix(p, payloadGated); ok {
		p, out.gated = rest, true
	}
	switch {
	case p == payloadPoll:
		out.poll = true
		return out
	case strings.HasPrefix(p, payloadDue):
		if n, err := strconv.ParseInt(p[len(payloadDue):], 10, 64); err == nil && n > 0 {
			out.due = n
			return out
		}
	case strings.HasPrefix(p, payloadAt):
		if secs, err := strconv.ParseFloat(p[len(payloadAt):], 64); err == nil && secs > 0 {
			whole := math.Floor(secs)
			out.at = time.Unix(int64(whole), int64((secs-whole)*1e9))
			return out
		}
	case strings.HasPrefix(p, payloadIn):
		if secs, err := strconv.ParseFloat(p[len(payloadIn):], 64); err == nil && secs > 0 {
			out.in = time.Duration(secs * float64(time.Second))
			return out
		}
	}
	out.due = 1
	return out
}
