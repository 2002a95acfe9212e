package jobwatchtest_test

import (
	"context"
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
