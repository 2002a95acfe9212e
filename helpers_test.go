package jobwatch_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	pgtest.Main(&leakCheckM{m})
}

// leakCheckM runs the tests and then fails the run if any goroutine the
// tests started (the library's included) is still running.
type leakCheckM struct{ *testing.M }

func (l *leakCheckM) Run() int {
	code := l.M.Run()
	if code != 0 {
		return code
	}
	// pgtest's ephemeral server, if it started one, is stopped after this
	// check; its goroutine waits for the server process.
	server := goleak.IgnoreAnyFunction("github.com/jobwatch-go/jobwatch/internal/pgtest.(*Cluster).Start.func1")
	if err := goleak.Find(server); err != nil {
		fmt.Println("goroutine leak:", err)
		return 1
	}
	return 0
}

// db is one test's own database.
type db struct {
	url  string
	pool *pgxpool.Pool
}

func newDB(t *testing.T) db {
	t.Helper()
	u, drop, err := pgtest.CreateDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := drop(); err != nil {
			t.Error(err)
		}
	})
	pool, err := pgxpool.New(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return db{url: u, pool: pool}
}

// with returns the database's connection string with one more setting,
// whatever form TEST_DATABASE_URL has (URL, key=value DSN or nothing).
func (d db) with(t *testing.T, key, value string) string {
	t.Helper()
	u, err := pgtest.WithParam(d.url, key, value)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// backends counts the server connections whose application_name is app.
func (d db) backends(t *testing.T, app string) int {
	t.Helper()
	var n int
	if err := d.pool.QueryRow(ctxT(t), "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()", app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func (d db) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.pool.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (d db) jobTable(t *testing.T, table string) {
	t.Helper()
	d.exec(t, jobwatch.CreateJobTableSQL(table))
}

// logs records what the library logs, for assertions, and prints it when
// the test fails.
type logs struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func newLogs(t *testing.T) (*logs, jobwatch.Option) {
	l := &logs{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("library log:\n%s", l.String())
		}
	})
	h := slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug})
	return l, jobwatch.WithLogger(slog.New(h))
}

func (l *logs) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logs) count(substr string) int {
	return strings.Count(l.String(), substr)
}

// lines counts the log lines that contain substr.
func (l *logs) lines(substr string) int {
	n := 0
	for _, line := range strings.Split(l.String(), "\n") {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

func testListener(t *testing.T, url string, opts ...jobwatch.Option) *jobwatch.Listener {
	t.Helper()
	l, err := jobwatch.NewListener(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

const waitLimit = 15 * time.Second

// waitWake waits for a message on ch and fails the test if none comes.
func waitWake(t *testing.T, ch <-chan jobwatch.Message, what string) {
	t.Helper()
	select {
	case m := <-ch:
		if m != jobwatch.JobAvailable {
			t.Fatalf("%s: got %v, want jobwatch.JobAvailable", what, m)
		}
	case <-time.After(waitLimit):
		t.Fatalf("%s: no jobwatch.JobAvailable within %v", what, waitLimit)
	}
}

func drain(ch <-chan jobwatch.Message) int {
	n := 0
	for {
		select {
		case <-ch:
			n++
		default:
			return n
		}
	}
}

// eventually waits until cond holds, checking every few milliseconds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	eventuallyWithin(t, waitLimit, what, cond)
}

// eventuallyWithin is eventually with a limit of its own.
func eventuallyWithin(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// settle waits until the watch has finished its start-up (first poll done)
// and empties the channel of the wake-ups that start-up may send.
func settle(t *testing.T, w interface{ Stats() jobwatch.Stats }, ch <-chan jobwatch.Message) {
	t.Helper()
	eventually(t, "first poll", func() bool { return w.Stats().Polls >= 1 })
	drain(ch)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// watchSetup says how a test watches a table. Its zero value watches
// "jobs", created first, with a poll interval of an hour and a wake channel
// of 10, through a Listener on the test's database and its pool.
type watchSetup struct {
	table    string
	interval time.Duration
	capacity int
	listener *jobwatch.Listener
	pool     *pgxpool.Pool
	noTable  bool              // do not create the table
	opts     []jobwatch.Option // for the watch, besides the logger
}

// watch starts the watch s describes, logging with logger (from newLogs),
// waits for its first poll, empties its channel and closes it when the
// test ends.
func (d db) watch(t *testing.T, logger jobwatch.Option, s watchSetup) (*jobwatch.Watch, chan jobwatch.Message, *jobwatch.Listener) {
	t.Helper()
	if s.table == "" {
		s.table = "jobs"
	}
	if s.interval == 0 {
		s.interval = time.Hour
	}
	if s.capacity == 0 {
		s.capacity = 10
	}
	if s.listener == nil {
		s.listener = testListener(t, d.url, logger)
	}
	if s.pool == nil {
		s.pool = d.pool
	}
	if !s.noTable {
		d.jobTable(t, s.table)
	}
	ch := make(chan jobwatch.Message, s.capacity)
	w, err := jobwatch.WatchForJob(ctxT(t), s.pool, s.listener, s.table, s.interval, ch, append(s.opts, logger)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	settle(t, w, ch)
	return w, ch, s.listener
}

// startWatch is watch for the common case.
func startWatch(t *testing.T, d db, table string, interval time.Duration, capacity int, logger jobwatch.Option, opts ...jobwatch.Option) (*jobwatch.Watch, chan jobwatch.Message, *jobwatch.Listener) {
	t.Helper()
	return d.watch(t, logger, watchSetup{table: table, interval: interval, capacity: capacity, opts: opts})
}

// triggersHealthy reports NotificationTriggersHealthy for table, failing
// the test on an error.
func triggersHealthy(t *testing.T, pool *pgxpool.Pool, table string) bool {
	t.Helper()
	healthy, err := jobwatch.NotificationTriggersHealthy(ctxT(t), pool, table)
	require.NoError(t, err, table)
	return healthy
}
