package jobwatch

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// maxIdentifierLen is PostgreSQL's NAMEDATALEN-1: the longest name, in bytes,
// of a channel, function or trigger.
const maxIdentifierLen = 63

// The prefixes of the names derived from a table name: IHP's, then
// jobwatch's own.
const (
	channelPrefix       = "job_available_"
	ihpFunctionPrefix   = "notify_job_queued_"
	insertTriggerPrefix = "did_insert_job_"
	updateTriggerPrefix = "did_update_job_"

	functionPrefix          = "jobwatch_notify_"
	partInsertTriggerPrefix = "jobwatch_insert_"
	partUpdateTriggerPrefix = "jobwatch_update_"
	rowTriggerPrefix        = "jobwatch_rows_"
	rowFunctionPrefix       = "jobwatch_notify_rows_"
	counterPrefix           = "jobwatch_skips_"
	indexPrefix             = "jobwatch_pending_"
)

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
// that app.jobs and public.jobs get different channels. A part that holds
// a dot or a double quote is written quoted, as PostgreSQL reads it, so
// that distinct tables never share a base: "a.b".c, a."b.c" and the
// unqualified "a.b" (for which IHP's unquoted names cannot work) differ
// from each other and from a.b.
func (t tableRef) base() string {
	if t.schema == "" {
		return basePart(t.name)
	}
	return basePart(t.schema) + "." + basePart(t.name)
}

func basePart(s string) string {
	if !strings.ContainsAny(s, `."`) {
		return s
	}
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// ihpName is the name IHP's code gets from PostgreSQL for prefix+base.
// IHP writes prefix+table into its DDL and PostgreSQL cuts an identifier
// over 63 bytes to 63 (on a character boundary), so for a table whose
// channel still fits (49 bytes or less) that cut name is the one IHP
// creates and checks, and the one jobwatch must use to share the table.
// Beyond that IHP cannot work at all (its NOTIFY fails with "channel name
// too long"), and ownName's hashed scheme applies.
func ihpName(prefix, base string) string {
	if len(prefix)+len(base) <= maxIdentifierLen {
		return prefix + base
	}
	if len(channelPrefix)+len(base) > maxIdentifierLen {
		return ownName(prefix, base)
	}
	name := prefix + base
	cut := maxIdentifierLen
	for cut > 0 && !utf8.RuneStart(name[cut]) {
		cut--
	}
	return name[:cut]
}

// ownName returns prefix+base when it fits in 63 bytes. Otherwise it keeps
// as much of base as fits, on a character boundary, and appends "_" and 8
// hex digits of the SHA-256 of base, so the result is deterministic, fits,
// and differs between tables that share a long prefix: two tables never
// share one of jobwatch's own functions, whose bodies name a channel.
func ownName(prefix, base string) string {
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
	table   tableRef
	channel string

	// IHP's names. The triggers jobwatch creates on the table itself carry
	// IHP's trigger names, so that an IHP worker sharing the table sees
	// them as healthy and jobwatch sees IHP's.
	insertTrigger string
	updateTrigger string
	// ihpFunction is IHP's trigger function. jobwatch's triggers never call
	// it: an IHP worker re-creates it with its per-row body at every start,
	// and called once per statement that body would notify on every
	// UPDATE, the workers' own fetches included, and wake them in a loop.
	// jobwatch only keeps it serving IHP's per-row triggers, and only when
	// the name is exact (ownsIHPFunction): a cut name may be shared by
	// two tables, and replacing its body would send one table's jobs to the
	// other's channel.
	ihpFunction     string
	ownsIHPFunction bool

	// jobwatch's own names, never cut, so never shared between tables.
	function          string // what the statement triggers call
	partInsertTrigger string // statement triggers on each partition
	partUpdateTrigger string
	rowTrigger        string // row trigger of a partitioned table, see triggerSQL
	rowFunction       string
	counter           string // the notify gate's skip counter, a sequence (see gate.go)
	// setting is the custom run-time setting in which a transaction keeps
	// what it has already announced on the channel.
	setting string
	// The notify gate's advisory lock keys (see gate.go), one pair per
	// table, in the single-bigint key space (IHP's installation lock uses
	// two int4s, a space of its own).
	notifyKey, skipKey int64

	// job describes the table's rows: IHPJobTable unless WithJobTable
	// said otherwise (see describedAs).
	job JobTable
}

// custom reports whether the table is described by a JobTable other than
// IHP's, whose triggers and polls the server's reading of it drives.
func (n names) custom() bool { return n.job != IHPJobTable }

// describedAs returns n for a table described by t, or an error wrapping
// ErrInvalidJobTable for a description no table could be watched with.
func (n names) describedAs(t JobTable) (names, error) {
	if t == IHPJobTable {
		return n, nil
	}
	if err := checkJobTable(t); err != nil {
		return n, err
	}
	n.job = t
	return n, nil
}

func deriveNames(tableName string) (names, error) {
	ref, err := parseTableName(tableName)
	if err != nil {
		return names{table: ref}, err
	}
	b := ref.base()
	sum := sha256.Sum256([]byte(b))
	return names{
		table:             ref,
		channel:           ownName(channelPrefix, b),
		insertTrigger:     ihpName(insertTriggerPrefix, b),
		updateTrigger:     ihpName(updateTriggerPrefix, b),
		ihpFunction:       ihpName(ihpFunctionPrefix, b),
		ownsIHPFunction:   ihpName(ihpFunctionPrefix, b) == ownName(ihpFunctionPrefix, b),
		function:          ownName(functionPrefix, b),
		partInsertTrigger: ownName(partInsertTriggerPrefix, b),
		partUpdateTrigger: ownName(partUpdateTriggerPrefix, b),
		rowTrigger:        ownName(rowTriggerPrefix, b),
		rowFunction:       ownName(rowFunctionPrefix, b),
		counter:           ownName(counterPrefix, b),
		setting:           "jobwatch.t" + hex.EncodeToString(sum[:8]),
		notifyKey:         lockKey("notify", b),
		skipKey:           lockKey("skip", b),
		job:               IHPJobTable,
	}, nil
}

// lockKey derives an advisory lock key from a purpose and a table's base
// name: the first 8 bytes of a SHA-256, so that it needs no hashing on the
// server.
func lockKey(purpose, base string) int64 {
	sum := sha256.Sum256([]byte("jobwatch " + purpose + "\x00" + base))
	return int64(binary.BigEndian.Uint64(sum[:8]))
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

// quoteLiteral returns s as an SQL string literal that reads the same
// whatever standard_conforming_strings says.
func quoteLiteral(s string) string {
	s = strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(s, `\`, `\\`) + "'"
	}
	return "'" + s + "'"
}

func ident(s string) string { return pgx.Identifier{s}.Sanitize() }

// dollarQuote wraps body in a dollar quote whose tag does not occur in body.
func dollarQuote(tag, body string) string {
	t := "$" + tag + "$"
	for i := 0; strings.Contains(body, t); i++ {
		t = "$" + tag + strconv.Itoa(i) + "$"
	}
	return t + body + t
}
