package container_test

import (
	"context"
	"testing"

	"github.com/jobwatch-go/jobwatch/jobwatchtest"
	_ "github.com/jobwatch-go/jobwatch/jobwatchtest/container"
)

func TestMain(m *testing.M) { jobwatchtest.Main(m) }

// TestContainerSource: with JOBWATCHTEST_SOURCE=container (as CI runs it,
// with a Docker engine), the database comes from a container started by
// this package, password and all, and jobwatchtest's helpers work on it.
// Without a Docker engine it fails, saying what was tried.
func TestContainerSource(t *testing.T) {
	pool := jobwatchtest.NewDatabase(t)
	jobwatchtest.CreateJobTable(t, pool, "jobs")
	var version string
	if err := pool.QueryRow(context.Background(), "SELECT current_setting('server_version')").Scan(&version); err != nil {
		t.Fatal(err)
	}
	t.Logf("PostgreSQL %s in a container at %s", version, pool.Config().ConnConfig.Host)
	if pool.Config().ConnConfig.Password == "" {
		t.Error("the container's server wants a password; the pool has none")
	}
}
