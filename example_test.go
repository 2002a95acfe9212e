package jobwatch_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// exampleDB gives an example a fresh database with a job table named jobs.
// In your program, dsn is your own connection string.
func exampleDB() (dsn string, pool *pgxpool.Pool, done func()) {
	ctx := context.Background()
	dsn, drop, err := pgtest.CreateDatabase(ctx)
	if err != nil {
		log.Fatal(err)
	}
	pool, err = pgxpool.New(ctx, dsn)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := pool.Exec(ctx, jobwatch.CreateJobTableSQL("jobs")); err != nil {
		log.Fatal(err)
	}
	return dsn, pool, func() {
		pool.Close()
		_ = drop()
	}
}

func ExampleWatchForJob() {
	dsn, pool, done := exampleDB()
	defer done()
	ctx := context.Background()

	listener, err := jobwatch.NewListener(dsn) // one per process
	if err != nil {
		log.Fatal(err)
	}
	defer listener.Close()
	wake := make(chan jobwatch.Message, 8)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, "jobs", time.Minute, wake)
	if err != nil {
		log.Fatal(err)
	}
	defer watch.Close()

	if _, err := pool.Exec(ctx, "INSERT INTO jobs DEFAULT VALUES"); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-wake) // now fetch with UPDATE ... FOR UPDATE SKIP LOCKED
	// Output: JobAvailable
}

// A table of your own, here gue's: every row waits until it is deleted,
// due at run_at, routed by queue.
func ExampleWithJobTable() {
	dsn, pool, done := exampleDB()
	defer done()
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE gue_jobs (job_id bigserial PRIMARY KEY,
		run_at timestamptz NOT NULL DEFAULT now(), queue text NOT NULL DEFAULT '')`); err != nil {
		log.Fatal(err)
	}
	listener, err := jobwatch.NewListener(dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer listener.Close()
	wake := make(chan jobwatch.Message, 8)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, "gue_jobs", time.Minute, wake,
		jobwatch.WithJobTable(jobwatch.JobTable{RunAt: "run_at", Queue: "queue"}),
		jobwatch.WithQueues("emails"))
	if err != nil {
		log.Fatal(err)
	}
	defer watch.Close()

	if _, err := pool.Exec(ctx, "INSERT INTO gue_jobs (queue) VALUES ('reports'), ('emails')"); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-wake) // the emails job's; the reports job wakes no one here
	// Output: JobAvailable
}

func ExamplePollForJob() {
	_, pool, done := exampleDB()
	defer done()
	ctx := context.Background()
	if _, err := pool.Exec(ctx, "INSERT INTO jobs SELECT FROM generate_series(1, 3)"); err != nil {
		log.Fatal(err)
	}

	wake := make(chan jobwatch.Message, 8)
	poller, err := jobwatch.PollForJob(ctx, false, pool, "jobs", time.Minute, wake)
	if err != nil {
		log.Fatal(err)
	}
	defer poller.Close()
	for range 3 { // one per pending job
		fmt.Println(<-wake)
	}
	// Output:
	// JobAvailable
	// JobAvailable
	// JobAvailable
}

func ExampleListener_Subscribe() {
	dsn, pool, done := exampleDB()
	defer done()
	listener, err := jobwatch.NewListener(dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer listener.Close()

	got := make(chan jobwatch.Notification, 1)
	if _, err := listener.Subscribe("greetings", func(n jobwatch.Notification) { got <- n }); err != nil {
		log.Fatal(err)
	}
	if _, err := pool.Exec(context.Background(), "NOTIFY greetings, 'hello'"); err != nil {
		log.Fatal(err)
	}
	n := <-got
	fmt.Println(n.Channel, n.Payload)
	// Output: greetings hello
}

func ExampleEnsureNotificationTriggers() {
	_, pool, done := exampleDB()
	defer done()
	ctx := context.Background()

	healthy, _ := jobwatch.NotificationTriggersHealthy(ctx, pool, "jobs")
	fmt.Println("before:", healthy)
	if err := jobwatch.EnsureNotificationTriggers(ctx, pool, "jobs"); err != nil {
		log.Fatal(err)
	}
	healthy, _ = jobwatch.NotificationTriggersHealthy(ctx, pool, "jobs")
	fmt.Println("after:", healthy)
	// Output:
	// before: false
	// after: true
}

func ExampleChannelName() {
	fmt.Println(jobwatch.ChannelName("jobs"))
	fmt.Println(jobwatch.ChannelName("app.jobs"))
	fmt.Println(jobwatch.ChannelName(`"MixedJobs"`))
	// Output:
	// job_available_jobs
	// job_available_app.jobs
	// job_available_MixedJobs
}

// The trigger script can run in a migration, so that workers need no DDL
// rights.
func ExampleCreateNotificationTriggerSQL() {
	_, pool, done := exampleDB()
	defer done()
	if _, err := pool.Exec(context.Background(), jobwatch.CreateNotificationTriggerSQL("jobs")); err != nil {
		log.Fatal(err)
	}
	healthy, _ := jobwatch.NotificationTriggersHealthy(context.Background(), pool, "jobs")
	fmt.Println(healthy)
	// Output: true
}

// Diagnose is what `jobwatch doctor` prints; a worker can serve it on a
// health endpoint.
func ExampleDiagnose() {
	dsn, pool, done := exampleDB()
	defer done()
	ctx := context.Background()
	if err := jobwatch.EnsureNotificationTriggers(ctx, pool, "jobs"); err != nil {
		log.Fatal(err)
	}
	findings, err := jobwatch.Diagnose(ctx, pool, dsn, "jobs")
	if err != nil {
		log.Fatal(err)
	}
	for _, f := range findings {
		fmt.Println(f.Status, f.Check)
	}
	// Output:
	// OK server
	// OK table
	// OK triggers
	// OK privileges
	// OK index
	// OK jobs
	// OK notify queue
	// OK delivery
}

func ExampleParsePayload() {
	for _, p := range []string{"", "due:12", "poll", "g:due:3"} {
		fmt.Println(jobwatch.ParsePayload(p))
	}
	// Output:
	// 1 job due
	// 12 jobs due
	// look at the table
	// 3 jobs due (gated)
}

func ExampleDropNotificationTriggerSQL() {
	_, pool, done := exampleDB()
	defer done()
	ctx := context.Background()
	if _, err := pool.Exec(ctx, jobwatch.CreateNotificationTriggerSQL("jobs")); err != nil { // the up migration
		log.Fatal(err)
	}
	if _, err := pool.Exec(ctx, jobwatch.DropNotificationTriggerSQL("jobs")); err != nil { // the down migration
		log.Fatal(err)
	}
	var left int
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass)
		+ (SELECT count(*) FROM pg_proc WHERE proname LIKE '%jobs') + (SELECT count(*) FROM pg_class WHERE relkind = 'S')`).Scan(&left); err != nil {
		log.Fatal(err)
	}
	fmt.Println("triggers, functions and counters left:", left)
	// Output: triggers, functions and counters left: 0
}

func ExampleWithFleet() {
	dsn, pool, done := exampleDB()
	defer done()
	ctx := context.Background()
	// Two processes' worth, each with its Listener, slots and watch.
	var watches []*jobwatch.Watch
	var wakes []chan jobwatch.Message
	for range 2 {
		listener, err := jobwatch.NewListener(dsn)
		if err != nil {
			log.Fatal(err)
		}
		defer listener.Close()
		slots := make(chan struct{}, 4) // a slot per running job
		wake := make(chan jobwatch.Message, 4)
		watch, err := jobwatch.WatchForJob(ctx, pool, listener, "jobs", time.Minute, wake,
			jobwatch.WithFleet(func() int { return cap(slots) - len(slots) }))
		if err != nil {
			log.Fatal(err)
		}
		defer watch.Close()
		watches, wakes = append(watches, watch), append(wakes, wake)
	}
	for _, w := range watches { // until each sees both members
		for w.Stats().Fleet.Members < 2 || w.Stats().Polls < 1 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if _, err := pool.Exec(ctx, "INSERT INTO jobs DEFAULT VALUES"); err != nil {
		log.Fatal(err)
	}
	chosen := 0
	for i, w := range watches {
		for w.Stats().Fleet.Chosen+w.Stats().Fleet.Left < 1 { // until it has read the notification
			time.Sleep(10 * time.Millisecond)
		}
		if w.Stats().Fleet.Chosen > 0 {
			chosen++
			fmt.Println(<-wakes[i]) // this process fetches the job
		}
	}
	fmt.Println("processes woken:", chosen)
	// Output:
	// JobAvailable
	// processes woken: 1
}
