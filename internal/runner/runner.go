// Package runner is jobwatch's tuned job runner: the subject of the
// multi-process tests (through internal/cmd/runner) and of the benchmark.
// It does what examples/worker does, and more: two fetchers keep a fetch
// in flight while the other's jobs start, finished jobs are recorded in
// batches, jobs whose worker died are put back in the queue (StaleAfter),
// failing jobs are retried with a backoff, and ExitWhenIdle ends it when
// nothing is left. Start from examples/worker for your own runner; come
// here for these refinements.
package runner

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// Config is how a runner runs.
type Config struct {
	Table        string
	Concurrency  int
	PollInterval time.Duration
	StaleAfter   time.Duration // a running job locked longer than this is put back in the queue
	MaxAttempts  int
	ExitWhenIdle bool // stop once no job is pending, scheduled or running
	// Perform is the job; attempt counts from 1.
	Perform func(ctx context.Context, attempt int) error
	// Started, when set, is called as each job starts, with its id.
	Started func(id pgtype.UUID)
	// Ready, when set, is called once the runner watches the table.
	Ready  func()
	Logger *slog.Logger
}

// Counts are what a runner did.
type Counts struct{ Ran, Failed, Fetches int64 }

// Run watches the table and runs its jobs until ctx ends (or, with
// ExitWhenIdle, nothing is left), then waits for the jobs it started and
// their recording. It logs "worker started" once it watches the table.
func Run(ctx context.Context, pool *pgxpool.Pool, listener *jobwatch.Listener, c Config) (Counts, error) {
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	q, err := newQueries(c.Table)
	if err != nil {
		return Counts{}, err
	}
	wake := make(chan jobwatch.Message, c.Concurrency)
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, c.Table, c.PollInterval, wake, jobwatch.WithLogger(c.Logger))
	if err != nil {
		return Counts{}, err
	}
	defer watch.Close()

	var workerID pgtype.UUID
	_, _ = rand.Read(workerID.Bytes[:])
	workerID.Valid = true
	w := &worker{c: c, pool: pool, q: q, id: workerID, log: c.Logger, done: doneBatch{waiting: make(chan struct{}, 1)}}
	c.Logger.Info("worker started", "table", c.Table, "concurrency", c.Concurrency, "worker_id", fmt.Sprintf("%x", workerID.Bytes))
	if c.Ready != nil {
		c.Ready()
	}

	var wg sync.WaitGroup
	wg.Go(func() { w.fetchLoop(ctx, wake) })
	wg.Go(func() { w.housekeeping(ctx, stop) })
	wg.Wait()
	return Counts{Ran: w.ran.Load(), Failed: w.failed.Load(), Fetches: w.fetches.Load()}, nil
}

type worker struct {
	c    Config
	pool *pgxpool.Pool
	q    queries
	id   pgtype.UUID
	log  *slog.Logger
	done doneBatch

	ran, failed, fetches atomic.Int64
}

// fetchLoop runs the fetchers and the completer. Each fetcher waits for a
// wake-up, then fetches due jobs, as many at a time as there are free
// slots, and starts them, until none is due. One statement (UPDATE ... FOR
// UPDATE SKIP LOCKED ... RETURNING) locks a batch; two fetchers keep a
// round trip in flight while the other's jobs start; a completer marks
// finished jobs in batches. A burst thus costs a few round trips per batch
// instead of two commits per job. On shutdown fetching stops and the loop
// waits for the jobs it started and their recording.
func (w *worker) fetchLoop(ctx context.Context, wake <-chan jobwatch.Message) {
	slots := make(chan struct{}, w.c.Concurrency)
	// Results wait here for the completer; a job's slot is free as soon
	// as the job returns.
	results := make(chan result, 64*w.c.Concurrency)
	completerDone := make(chan struct{})
	go func() {
		defer close(completerDone)
		w.complete(results)
	}()
	var running, fetchers sync.WaitGroup
	for range min(2, w.c.Concurrency) {
		fetchers.Add(1)
		go func() {
			defer fetchers.Done()
			w.fetcher(ctx, wake, slots, results, &running)
		}()
	}
	fetchers.Wait()
	running.Wait()
	close(results)
	<-completerDone
}

func (w *worker) fetcher(ctx context.Context, wake <-chan jobwatch.Message, slots chan struct{},
	results chan<- result, running *sync.WaitGroup) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		for ctx.Err() == nil {
			// Take every free slot, waiting for at least one.
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			free := 1
		take:
			for free < w.c.Concurrency {
				select {
				case slots <- struct{}{}:
					free++
				default:
					break take
				}
			}
			jobs, err := w.fetch(ctx, free)
			if err != nil && ctx.Err() == nil {
				w.log.Error("fetch failed", "error", err)
			}
			for range free - len(jobs) {
				<-slots
			}
			for _, j := range jobs {
				running.Add(1)
				go func() {
					defer running.Done()
					if w.c.Started != nil {
						w.c.Started(j.id)
					}
					r := result{job: j, err: w.c.Perform(ctx, j.attempts)}
					<-slots
					results <- r
				}()
			}
			if len(jobs) < free {
				break // nothing more is due; wait for the next wake-up
			}
		}
	}
}

type job struct {
	id       pgtype.UUID
	attempts int
}

type result struct {
	job job
	err error
}

// fetch locks up to n due jobs for this worker, recording the finished
// ones that wait in w.done.
func (w *worker) fetch(ctx context.Context, n int) ([]job, error) {
	w.fetches.Add(1)
	done := w.done.take()
	// Not ctx: a fetch cut short by a shutdown may still have marked jobs
	// running on the server, and no one would run them.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	rows, err := w.pool.Query(ctx, w.q.fetch, w.id, n, done)
	if err != nil {
		w.done.add(done...)
		return nil, err
	}
	var jobs []job
	recorded := map[pgtype.UUID]bool{}
	var j job
	var wasDone bool
	_, err = pgx.ForEachRow(rows, []any{&j.id, &j.attempts, &wasDone}, func() error {
		if wasDone {
			recorded[j.id] = true
		} else {
			jobs = append(jobs, j)
		}
		return nil
	})
	if err != nil {
		w.done.add(done...)
		return nil, err
	}
	var left []pgtype.UUID
	for _, id := range done {
		if !recorded[id] {
			left = append(left, id)
		}
	}
	w.done.add(left...)
	w.ran.Add(int64(len(recorded)))
	return jobs, nil
}

// complete records results. Successes wait in w.done for the next fetch,
// which records them in its own statement; what is still there doneWait
// after it arrived is recorded by an UPDATE of its own. Each failure gets
// an UPDATE of its own. It runs to the end even during shutdown: a
// graceful stop records the jobs it ran.
func (w *worker) complete(results <-chan result) {
	ctx := context.Background()
	var flush <-chan time.Time
	for {
		select {
		case r, ok := <-results:
			if !ok {
				w.flushDone(ctx)
				return
			}
			if r.err != nil {
				w.recordFailure(ctx, r)
				continue
			}
			w.done.add(r.job.id)
		case <-w.done.waiting:
			if flush == nil {
				flush = time.After(doneWait)
			}
		case <-flush:
			flush = nil
			w.flushDone(ctx)
		}
	}
}

// doneWait is how long a finished job waits for a fetch to record it.
const doneWait = 2 * time.Millisecond

func (w *worker) flushDone(ctx context.Context) {
	ids := w.done.take()
	if len(ids) == 0 {
		return
	}
	if _, err := w.pool.Exec(ctx, w.q.succeed, ids, w.id); err != nil {
		w.log.Error("mark jobs succeeded", "error", err)
		return
	}
	w.ran.Add(int64(len(ids)))
}

// doneBatch is the successes not recorded yet.
type doneBatch struct {
	mu      sync.Mutex
	ids     []pgtype.UUID
	waiting chan struct{} // buffered(1): the batch has ids
}

func (d *doneBatch) add(ids ...pgtype.UUID) {
	if len(ids) == 0 {
		return
	}
	d.mu.Lock()
	d.ids = append(d.ids, ids...)
	d.mu.Unlock()
	select {
	case d.waiting <- struct{}{}:
	default:
	}
}

func (d *doneBatch) take() []pgtype.UUID {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := d.ids
	d.ids = nil
	return ids
}

func (w *worker) recordFailure(ctx context.Context, r result) {
	w.failed.Add(1)
	w.log.Info("job failed", "id", fmt.Sprintf("%x", r.job.id.Bytes), "attempt", r.job.attempts, "error", r.err)
	status := "job_status_retry"
	if r.job.attempts >= w.c.MaxAttempts {
		status = "job_status_failed"
	}
	if _, err := w.pool.Exec(ctx, w.q.fail, r.job.id, w.id, status, r.err.Error()); err != nil {
		w.log.Error("mark job failed", "error", err)
	}
}

// housekeeping puts stale jobs back in the queue and, with -exit-when-idle,
// stops the worker once there is nothing left to do.
func (w *worker) housekeeping(ctx context.Context, stop context.CancelFunc) {
	stale := fmt.Sprintf("%d milliseconds", w.c.StaleAfter.Milliseconds())
	tick := time.NewTicker(min(w.c.StaleAfter/2, time.Minute))
	defer tick.Stop()
	idle := time.NewTicker(100 * time.Millisecond)
	defer idle.Stop()
	if !w.c.ExitWhenIdle {
		idle.Stop()
	}
	for {
		if tag, err := w.pool.Exec(ctx, w.q.unlockStale, stale); err == nil && tag.RowsAffected() > 0 {
			w.log.Warn("put stale jobs back in the queue", "count", tag.RowsAffected())
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-idle.C:
			var busy bool
			if err := w.pool.QueryRow(ctx, w.q.busy).Scan(&busy); err == nil && !busy {
				w.log.Info("no job left: exiting")
				stop()
				return
			}
		}
	}
}
