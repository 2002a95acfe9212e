package jobwatchtest_test

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/jobwatch-go/jobwatch/jobwatchtest"
)

// Settings for a test's connection string: WithParam works whether the
// server came as a URL, a key=value DSN or pgx's defaults.
func ExampleWithParam() {
	ctx := context.Background()
	url, drop, err := jobwatchtest.CreateDatabase(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer drop()
	url, err = jobwatchtest.WithParam(url, "application_name", "my_worker_test")
	if err != nil {
		fmt.Println(err)
		return
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close(ctx)
	var app string
	_ = conn.QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&app)
	fmt.Println(app)
	// Output: my_worker_test
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
