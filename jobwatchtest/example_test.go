package jobwatchtest_test

import (
	"context"
	"testing"

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
