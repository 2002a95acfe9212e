package jobwatchtest_test

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch/jobwatchtest"
)

func TestMain(m *testing.M) { jobwatchtest.Main(m) }

// TestNewDatabase: each call gives a fresh, empty database, from parallel
// tests too, and the database is gone when the test ends.
func TestNewDatabase(t *testing.T) {
	t.Parallel()
	var (
		mu    sync.Mutex
		names = map[string]bool{}
	)
	t.Run("group", func(t *testing.T) {
		for range 4 {
			t.Run("db", func(t *testing.T) {
				t.Parallel()
				pool := jobwatchtest.NewDatabase(t)
				jobwatchtest.CreateJobTable(t, pool, "jobs")
				ctx := context.Background()
				var name string
				var tables int
				if err := pool.QueryRow(ctx, `SELECT current_database(),
					(SELECT count(*) FROM pg_tables WHERE schemaname = 'public')`).Scan(&name, &tables); err != nil {
					t.Fatal(err)
				}
				if tables != 1 {
					t.Errorf("want only the job table, got %d tables", tables)
				}
				mu.Lock()
				names[name] = true
				mu.Unlock()
			})
		}
	})
	if len(names) != 4 {
		t.Fatalf("want 4 distinct databases, got %v", names)
	}
	conn, err := pgx.Connect(context.Background(), jobwatchtest.ServerURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for name := range names {
		var exists bool
		if err := conn.QueryRow(context.Background(), "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
			t.Fatal(err)
		}
		if exists {
			t.Errorf("database %s was not dropped", name)
		}
	}
}

// TestWithParam: a setting added to each form a connection string can take
// (URL with and without a query string, key=value DSN, empty) reaches the
// server, and a value with spaces and quotes survives.
func TestWithParam(t *testing.T) {
	t.Parallel()
	dbURL := jobwatchtest.NewDatabaseURL(t)
	var dbName string
	{
		conn, err := pgx.Connect(context.Background(), dbURL)
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.QueryRow(context.Background(), "SELECT current_database()").Scan(&dbName); err != nil {
			t.Fatal(err)
		}
		conn.Close(context.Background())
	}
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	// The same server in each form a connection string takes, password
	// included (a container's server wants one).
	host := cfg.Host
	dsn := fmt.Sprintf("host=%s port=%d user=%s dbname=%s", host, cfg.Port, cfg.User, dbName)
	user := url.User(cfg.User)
	if cfg.Password != "" {
		dsn += " password='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(cfg.Password) + "'"
		user = url.UserPassword(cfg.User, cfg.Password)
	}
	plainURL := fmt.Sprintf("postgres://%s@%s/%s", user, net.JoinHostPort(host, strconv.Itoa(int(cfg.Port))), dbName)
	if strings.HasPrefix(host, "/") {
		plainURL = fmt.Sprintf("postgres://%s@/%s?host=%s&port=%d", user, dbName, url.QueryEscape(host), cfg.Port)
	}
	for name, base := range map[string]string{
		"url without query": plainURL,
		"url with query":    plainURL + map[bool]string{true: "&", false: "?"}[strings.Contains(plainURL, "?")] + "sslmode=disable",
		"dsn":               dsn,
		"test database":     dbURL,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			want := `it's a "test" \ app`
			s, err := jobwatchtest.WithParam(base, "application_name", "first")
			if err != nil {
				t.Fatal(err)
			}
			s, err = jobwatchtest.WithParam(s, "application_name", want)
			if err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(context.Background(), s)
			if err != nil {
				t.Fatalf("connect with %q: %v", s, err)
			}
			defer conn.Close(context.Background())
			var got, db string
			if err := conn.QueryRow(context.Background(), "SELECT current_setting('application_name'), current_database()").Scan(&got, &db); err != nil {
				t.Fatal(err)
			}
			if got != want || db != dbName {
				t.Errorf("application_name %q in %s, want %q in %s (connection string %q)", got, db, want, dbName, s)
			}
		})
	}
	if s, err := jobwatchtest.WithParam("", "application_name", "x"); err != nil || s != "application_name='x'" {
		t.Errorf("empty connection string: %q, %v", s, err)
	}
	if _, err := jobwatchtest.WithParam("postgres://%zz", "a", "b"); err == nil {
		t.Error("an unparsable URL gives no error")
	}
}
