package jobwatchtest_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/jobwatch-go/jobwatch/jobwatchtest"
)

// A test of your own worker: a fresh database with IHP's job table, gone
// when the test ends. Call jobwatchtest.Main(m) from your TestMain.
func ExampleNewDatabase() {
	testMyWorker := func(t *testing.T) {
		t.Parallel()
		pool := jobwatchtest.NewDatabase(t)
		jobwatchtest.CreateJobTable(t, pool, "jobs")
		if _, err := pool.Exec(context.Background(), "INSERT INTO jobs DEFAULT VALUES"); err != nil {
			t.Fatal(err)
		}
		// ... start the worker on pool and wait until the job has run.
	}
	_ = testMyWorker
}

// CreateDatabase serves code without a testing.TB, such as a fixture shared
// by a whole TestMain.
func ExampleCreateDatabase() {
	ctx := context.Background()
	url, drop, err := jobwatchtest.CreateDatabase(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer drop()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close(ctx)
	var tables int
	_ = conn.QueryRow(ctx, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").Scan(&tables)
	fmt.Println("tables in the new database:", tables)
	// Output: tables in the new database: 0
}
