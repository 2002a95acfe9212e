package jobwatch

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// maxIdentifierLen is PostgreSQL's NAMEDATALEN-1: the longest name, in bytes,
// of a channel, function or trigger.
const maxIdentifierLen = 63

// IHP's prefixes for the names derived from a table name.
const (
	channelPrefix       = "job_available_"
	functionPrefix      = "notify_job_queued_"
	stmtFunctionPrefix  = "jobwatch_notify_" // jobwatch's own; see names.stmtFunction
	insertTriggerPrefix = "did_insert_job_"
	updateTriggerPrefix = "did_update_job_"
)

// ErrInvalidTableName is returned (wrapped) for a table name that is empty or
// that PostgreSQL could not read as [schema.]table.
var ErrInvalidTableName = errors.New("invalid table name")

// tableRef is a parsed table name: the optional schema and the table, each
// as PostgreSQL stores it (unquoted parts folded to lower case).
type tableRef struct {
	raw    string // as the caller wrote it, for messages
	schema string // "" when unqualified
	name   string
}

// parseTableName reads name as PostgreSQL reads a table name: one or two
// dot-separated parts, each either a quoted identifier ("Mixed""Case") or an
// unquoted one, which is folded to lower case.
func parseTableName(name string) (tableRef, error) {
	ref := tableRef{raw: name}
	if strings.TrimSpace(name) == "" {
		return ref, fmt.Errorf("%w: empty", ErrInvalidTableName)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return ref, fmt.Errorf("%w %q: contains a NUL byte", ErrInvalidTableName, name)
	}
	var parts []string
	s := strings.TrimSpace(name)
	for {
		var part string
		if strings.HasPrefix(s, `"`) {
			var b strings.Builder
			i := 1
			closed := false
			for i < len(s) {
				if s[i] == '"' {
					if i+1 < len(s) && s[i+1] == '"' {
						b.WriteByte('"')
						i += 2
						continue
					}
					closed = true
					i++
					break
				}
				b.WriteByte(s[i])
				i++
			}
			if !closed {
				return ref, fmt.Errorf("%w %q: unterminated quoted identifier", ErrInvalidTableName, name)
			}
			part = b.String()
			if part == "" {
				return ref, fmt.Errorf("%w %q: zero-length quoted identifier", ErrInvalidTableName, name)
			}
			s = s[i:]
		} else {
			i := 0
			for i < len(s) && s[i] != '.' {
				c := s[i]
				ok := c == '_' || c == '$' || c >= 0x80 ||
					('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9')
				if !ok {
					return ref, fmt.Errorf("%w %q: unexpected %q (quote the name to use it)", ErrInvalidTableName, name, c)
				}
				i++
			}
			part = s[:i]
			if part == "" {
				return ref, fmt.Errorf("%w %q: empty part", ErrInvalidTableName, name)
			}
			if c := part[0]; c == '$' || ('0' <= c && c <= '9') {
				return ref, fmt.Errorf("%w %q: an unquoted name cannot start with %q", ErrInvalidTableName, name, c)
			}
			if !utf8.ValidString(part) {
				return ref, fmt.Errorf("%w %q: not valid UTF-8", ErrInvalidTableName, name)
			}
			part = foldASCII(part)
			s = s[i:]
		}
		parts = append(parts, part)
		if s == "" {
			break
		}
		if s[0] != '.' {
			return ref, fmt.Errorf("%w %q: unexpected text after a quoted identifier", ErrInvalidTableName, name)
		}
		s = s[1:]
	}
	switch len(parts) {
	case 1:
		ref.name = parts[0]
	case 2:
		ref.schema, ref.name = parts[0], parts[1]
	default:
		return ref, fmt.Errorf("%w %q: expected [schema.]table", ErrInvalidTableName, name)
	}
	if len(ref.name) > maxIdentifierLen || len(ref.schema) > maxIdentifierLen {
		return ref, fmt.Errorf("%w %q: an identifier is longer than %d bytes", ErrInvalidTableName, name, maxIdentifierLen)
	}
	return ref, nil
}

// foldASCII lower-cases A-Z only, as PostgreSQL folds unquoted identifiers
// in a multi-byte encoding.
func foldASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// quoted returns the table name as safe SQL: every part double-quoted.
func (t tableRef) quoted() string {
	if t.schema == "" {
		return pgx.Identifier{t.name}.Sanitize()
	}
	return pgx.Identifier{t.schema, t.name}.Sanitize()
}

// base is the text the derived names are built from: the table name for an
// unqualified table (IHP's behaviour), schema.table for a qualified one, so
// that app.jobs and public.jobs get different channels.
func (t tableRef) base() string {
	if t.schema == "" {
		return t.name
	}
	return t.schema + "." + t.name
}

// qualify returns the safely quoted name of an object in the table's schema.
func (t tableRef) qualify(object string) string {
	if t.schema == "" {
		return pgx.Identifier{object}.Sanitize()
	}
	return pgx.Identifier{t.schema, object}.Sanitize()
}

// derivedName returns prefix+base when it fits in 63 bytes (IHP's exact
// name). Otherwise it keeps as much of base as fits, on a character
// boundary, and appends "_" and 8 hex digits of the SHA-256 of base, so the
// result is deterministic, fits, and differs between tables that share a
// long prefix.
func derivedName(prefix, base string) string {
	if len(prefix)+len(base) <= maxIdentifierLen {
		return prefix + base
	}
	sum := sha256.Sum256([]byte(base))
	suffix := "_" + hex.EncodeToString(sum[:4])
	keep := maxIdentifierLen - len(prefix) - len(suffix)
	for keep > 0 && !utf8.RuneStart(base[keep]) {
		keep--
	}
	return prefix + base[:keep] + suffix
}

// names holds every name derived from one table name.
type names struct {
	table    tableRef
	channel  string
	function string // IHP's trigger function name
	// stmtFunction is the function jobwatch's statement triggers call. It
	// is not IHP's, because an IHP worker re-creates that one with its
	// per-row body at every start; called once per statement, that body
	// would notify on every UPDATE, the fetch's own included, and wake the
	// workers in a loop.
	stmtFunction  string
	insertTrigger string
	updateTrigger string
}

func deriveNames(tableName string) (names, error) {
	ref, err := parseTableName(tableName)
	if err != nil {
		return names{table: ref}, err
	}
	b := ref.base()
	return names{
		table:         ref,
		channel:       derivedName(channelPrefix, b),
		function:      derivedName(functionPrefix, b),
		stmtFunction:  derivedName(stmtFunctionPrefix, b),
		insertTrigger: derivedName(insertTriggerPrefix, b),
		updateTrigger: derivedName(updateTriggerPrefix, b),
	}, nil
}

// ChannelName returns the notification channel of a job table: for a plain
// table name IHP's "job_available_<table>", for a schema-qualified one
// "job_available_<schema>.<table>", shortened with a hash suffix when it
// would pass PostgreSQL's 63-byte limit. Quoted parts keep their case.
//
// A name that cannot be a table name (see [ErrInvalidTableName]) gets a
// channel that no trigger of this package ever notifies.
func ChannelName(tableName string) string {
	n, err := deriveNames(tableName)
	if err != nil {
		return derivedName("jobwatch_invalid_", tableName)
	}
	return n.channel
}

// QuoteTableName reads tableName as every function of this package does
// ([schema.]table, unquoted parts folded to lower case, quoted parts kept)
// and returns it quoted for use in SQL, such as a job runner's fetch query.
// It returns an error wrapping ErrInvalidTableName for a name that is not
// one.
func QuoteTableName(tableName string) (string, error) {
	ref, err := parseTableName(tableName)
	if err != nil {
		return "", fmt.Errorf("jobwatch: %w", err)
	}
	return ref.quoted(), nil
}

// trySend puts msg on wake without blocking and reports whether it did.
func trySend(wake chan<- Message, msg Message) bool {
	select {
	case wake <- msg:
		return true
	default:
		return false
	}
}

// dropReporter counts wake-ups dropped because the caller's channel was
// full and logs them at most once per interval, with the count since the
// last report, so a stalled consumer cannot flood the log.
type dropReporter struct {
	interval time.Duration
	report   func(dropped uint64)

	mu      sync.Mutex
	pending uint64
	last    time.Time
	total   atomic.Uint64
}

func (d *dropReporter) dropped(n uint64) {
	d.total.Add(n)
	d.mu.Lock()
	d.pending += n
	now := time.Now()
	if !d.last.IsZero() && now.Sub(d.last) < d.interval {
		d.mu.Unlock()
		return
	}
	count := d.pending
	d.pending = 0
	d.last = now
	d.mu.Unlock()
	d.report(count)
}

// wake sends up to n JobAvailable without blocking.
func (c *counters) wake(n int64) {
	var sent, dropped uint64
	for range n {
		if trySend(c.wakeCh, JobAvailable) {
			sent++
		} else {
			dropped = uint64(n) - sent
			break
		}
	}
	c.sent.Add(sent)
	if dropped > 0 {
		c.drops.dropped(dropped)
	}
}

// wakeUpTo sends up to n JobAvailable, no more than the channel has room
// for: n jobs need at most as many wake-ups as there are free slots, because
// a woken worker keeps fetching until none is due. Only a channel that is
// already full counts as a dropped wake-up.
func (c *counters) wakeUpTo(n int64) {
	free := int64(cap(c.wakeCh) - len(c.wakeCh))
	c.wake(max(min(n, free), 1))
}
