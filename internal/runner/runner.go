// Package runner is jobwatch's tuned job runner: the subject of the
// multi-process tests (through internal/cmd/runner) and of the benchmark.
// It does what examples/worker does, and more: two fetchers keep a fetch
// in flight while the other's jobs start, finished jobs are recorded in
// batches, a fetch reads ahead while jobs run shorter than a fetch takes,
// jobs whose worker died are put back in the queue (StaleAfter),
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
	Logger *slog.Logger // nil: slog.Default()
	// Options are given to the watch, after WithLogger.
	Options []jobwatch.Option
	// Fleet makes the watch a member of the table's fleet
	// (jobwatch.WithFleet), its room the runner's free slots.
	Fleet bool
	// Live, when set, counts what the runner does while it runs, and
	// receives its watch.
	Live *Live
}

// Counts are what a runner did.
type Counts struct{ Ran, Failed, Fetches int64 }

// Live is what a runner has done so far, readable while it runs.
type Live struct {
	Ran, Failed, Fetches atomic.Int64
	watch                atomic.Pointer[jobwatch.Watch]
}

// Watch returns the runner's watch, nil before it watches.
func (l *Live) Watch() *jobwatch.Watch { return l.watch.Load() }

// SetWatch records w as the watch whose counts l reports, for a process
// that watches a table without a runner.
func (l *Live) SetWatch(w *jobwatch.Watch) { l.watch.Store(w) }

// Run watches the table and runs its jobs until ctx ends (or, with
// ExitWhenIdle, nothing is left), then waits for the jobs it started and
// their recording. It logs "worker started" once it watches the table.
func Run(ctx context.Context, pool *pgxpool.Pool, listener *jobwatch.Listener, c Config) (Counts, error) {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	q, err := newQueries(c.Table)
	if err != nil {
		return Counts{}, err
	}
	wake := make(chan jobwatch.Message, c.Concurrency)
	slots := make(chan struct{}, c.Concurrency) // a place per running job
	opts := append([]jobwatch.Option{jobwatch.WithLogger(c.Logger)}, c.Options...)
	if c.Fleet {
		opts = append(opts, jobwatch.WithFleet(func() int { return cap(slots) - len(slots) }))
	}
	watch, err := jobwatch.WatchForJob(ctx, pool, listener, c.Table, c.PollInterval, wake, opts...)
	if err != nil {
		return Counts{}, err
	}
	defer watch.Close()
	if c.Live == nil {
		c.Live = &Live{}
	}
	c.Live.SetWatch(watch)

	var workerID pgtype.UUID
	_, _ = rand.Read(workerID.Bytes[:])
	workerID.Valid = true
	w := &worker{c: c, pool: pool, q: q, id: workerID, log: c.Logger, slots: slots, done: doneBatch{waiting: make(chan struct{}, 1)}}
	w.queued.w = w
	c.Logger.Info("worker started", "table", c.Table, "concurrency", c.Concurrency, "worker_id", fmt.Sprintf("%x", workerID.Bytes))
	if c.Ready != nil {
		c.Ready()
	}

	var wg sync.WaitGroup
	wg.Go(func() { w.fetchLoop(ctx, wake) })
	wg.Go(func() { w.housekeeping(ctx, stop) })
	wg.Wait()
	return Counts{Ran: c.Live.Ran.Load(), Failed: c.Live.Failed.Load(), Fetches: c.Live.Fetches.Load()}, nil
}

type worker struct {
	c    Config
	pool *pgxpool.Pool
	q    queries
	id   pgtype.UUID
	log  *slog.Logger
	done doneBatch

	slots   chan struct{} // a place per running job, Concurrency in all
	ahead   chan struct{} // a place per job read ahead, Concurrency in all
	queued  readQueue     // the jobs read ahead
	results chan result   // for the completer
	running sync.WaitGroup

	perform, fetchTime ewma // how long jobs and fetches take
}

// fetchLoop runs the fetchers and the completer. Each fetcher waits for a
// wake-up, then fetches due jobs, as many at a time as there are free
// slots, and starts them, until none is due. One statement (UPDATE ... FOR
// UPDATE SKIP LOCKED ... RETURNING) locks a batch; two fetchers keep a
// round trip in flight while the other's jobs start; a completer marks
// finished jobs in batches. A burst thus costs a few round trips per batch
// instead of two commits per job.
//
// While jobs run shorter than a fetch takes, a fetch also reads ahead: up
// to Concurrency jobs more than there are free slots, which wait in this
// process for the next free slot (see readAhead). On shutdown fetching
// stops, jobs read ahead and not started go back to the queue, and the loop
// waits for the jobs it started and their recording.
func (w *worker) fetchLoop(ctx context.Context, wake <-chan jobwatch.Message) {
	w.ahead = make(chan struct{}, w.c.Concurrency)
	// Results wait here for the completer; a job's slot is free as soon
	// as the job returns.
	w.results = make(chan result, 64*w.c.Concurrency)
	completerDone := make(chan struct{})
	go func() {
		defer close(completerDone)
		w.complete(w.results)
	}()
	var fetchers sync.WaitGroup
	for range min(2, w.c.Concurrency) {
		fetchers.Add(1)
		go func() {
			defer fetchers.Done()
			w.fetcher(ctx, wake)
		}()
	}
	fetchers.Wait()
	w.running.Wait()
	w.release(w.queued.takeAll())
	close(w.results)
	<-completerDone
}

func (w *worker) fetcher(ctx context.Context, wake <-chan jobwatch.Message) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		for ctx.Err() == nil {
			// Take every free slot, waiting for at least one, and as many
			// read-ahead places as are free when reading ahead pays.
			select {
			case w.slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			free := 1 + grab(w.slots, w.c.Concurrency-1)
			ahead := 0
			if w.readAhead() {
				ahead = grab(w.ahead, w.c.Concurrency)
			}
			jobs, err := w.fetch(ctx, free+ahead)
			if err != nil && ctx.Err() == nil {
				w.log.Error("fetch failed", "error", err)
			}
			now := time.Now()
			for i, j := range jobs {
				if i < free {
					w.start(ctx, queuedJob{job: j})
					continue
				}
				w.queued.push(ctx, queuedJob{job: j, at: now})
			}
			w.queued.freeSlots(ctx, max(0, free-len(jobs)))
			for range ahead - max(0, len(jobs)-free) {
				<-w.ahead
			}
			if len(jobs) < free+ahead {
				break // nothing more is due; wait for the next wake-up
			}
		}
	}
}

// grab takes up to n free places of a semaphore without waiting.
func grab(sem chan struct{}, n int) int {
	for i := range n {
		select {
		case sem <- struct{}{}:
		default:
			return i
		}
	}
	return n
}

// start runs j in a slot the caller holds. When j is done, the same slot
// runs the jobs read ahead, oldest first, and is freed when none is left.
func (w *worker) start(ctx context.Context, j queuedJob) {
	w.running.Add(1)
	go func() {
		defer w.running.Done()
		next := j
		for {
			// A job that waited here for half of StaleAfter is locked
			// afresh first, unless another worker has it by now.
			if next.at.IsZero() || time.Since(next.at) < w.c.StaleAfter/2 || w.touch(next.job) {
				w.run(ctx, next.job)
			}
			var ok bool
			if next, ok = w.queued.popOrFree(ctx); !ok {
				return
			}
		}
	}()
}

func (w *worker) run(ctx context.Context, j job) {
	if w.c.Started != nil {
		w.c.Started(j.id)
	}
	began := time.Now()
	r := result{job: j, err: w.c.Perform(ctx, j.attempts)}
	w.perform.observe(time.Since(began))
	w.results <- r
}

// touch renews the lock of a job read ahead; false if it is no longer
// this worker's.
func (w *worker) touch(j job) bool {
	tag, err := w.pool.Exec(context.Background(), w.q.touch, j.id, w.id)
	if err != nil {
		w.log.Error("renew job lock", "error", err)
		return false
	}
	return tag.RowsAffected() == 1
}

// release puts jobs read ahead and never started back in the queue.
func (w *worker) release(jobs []job) {
	if len(jobs) == 0 {
		return
	}
	ids := make([]pgtype.UUID, len(jobs))
	for i, j := range jobs {
		ids[i] = j.id
	}
	if _, err := w.pool.Exec(context.Background(), w.q.release, ids, w.id); err != nil {
		w.log.Error("put jobs read ahead back in the queue", "error", err)
	}
}

// readAhead says whether a fetch should lock more jobs than there are free
// slots: when jobs run shorter than a fetch takes, a job read ahead waits
// here less than a fetch would take, and the next fetch is hidden behind
// the jobs running. Jobs that run longer are left to other workers.
func (w *worker) readAhead() bool {
	p, f := w.perform.get(), w.fetchTime.get()
	return p > 0 && f > 0 && p < f
}

// ewma is a moving average of durations, safe for concurrent use.
type ewma struct{ v atomic.Int64 }

func (e *ewma) observe(d time.Duration) {
	old := e.v.Load()
	if old == 0 {
		e.v.Store(int64(d))
		return
	}
	e.v.Store(old + (int64(d)-old)/8)
}

func (e *ewma) get() time.Duration { return time.Duration(e.v.Load()) }

// queuedJob is a job read ahead, locked for this worker and not started.
type queuedJob struct {
	job job
	at  time.Time // when it was locked
}

// readQueue holds the jobs read ahead. Its lock also orders a slot's
// "nothing queued, free the slot" against a fetcher's "queue, then start
// on the free slots", so that no queued job waits while a slot is free.
type readQueue struct {
	mu   sync.Mutex
	jobs []queuedJob
	w    *worker
}

// push queues a job read ahead and starts it at once if a slot is free.
func (q *readQueue) push(ctx context.Context, j queuedJob) {
	q.mu.Lock()
	defer q.mu.Unlock()
	select {
	case q.w.slots <- struct{}{}:
		<-q.w.ahead
		q.w.start(ctx, j)
	default:
		q.jobs = append(q.jobs, j)
	}
}

// freeSlots hands n slots the caller holds to queued jobs, oldest first,
// and frees the others. Every slot a fetcher does not use goes through
// here: freed while jobs wait in the queue, a slot would leave them there
// until the next job ends, or for good if none is running.
func (q *readQueue) freeSlots(ctx context.Context, n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for range n {
		if len(q.jobs) == 0 || ctx.Err() != nil {
			<-q.w.slots
			continue
		}
		j := q.jobs[0]
		q.jobs = q.jobs[1:]
		<-q.w.ahead
		q.w.start(ctx, j)
	}
}

// popOrFree takes the oldest queued job, freeing its read-ahead place, or,
// when none is queued or ctx is done, frees the caller's slot.
func (q *readQueue) popOrFree(ctx context.Context) (queuedJob, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.jobs) == 0 || ctx.Err() != nil {
		<-q.w.slots
		return queuedJob{}, false
	}
	j := q.jobs[0]
	q.jobs = q.jobs[1:]
	<-q.w.ahead
	return j, true
}

// takeAll empties the queue, freeing the read-ahead places.
func (q *readQueue) takeAll() []job {
	q.mu.Lock()
	defer q.mu.Unlock()
	jobs := make([]job, len(q.jobs))
	for i, j := range q.jobs {
		jobs[i] = j.job
		<-q.w.ahead
	}
	q.jobs = nil
	return jobs
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
	w.c.Live.Fetches.Add(1)
	done := w.done.take()
	// Not ctx: a fetch cut short by a shutdown may still have marked jobs
	// running on the server, and no one would run them.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	began := time.Now()
	rows, err := w.pool.Query(ctx, w.q.fetch, w.id, n, done)
	if err != nil {
		w.done.add(done...)
		return nil, err
	}
	defer func() { w.fetchTime.observe(time.Since(began)) }()
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
	w.c.Live.Ran.Add(int64(len(recorded)))
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
	w.c.Live.Ran.Add(int64(len(ids)))
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
	w.c.Live.Failed.Add(1)
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
