package jobwatch_test

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// buildWorker builds the runner (internal/cmd/runner) once per test.
func buildWorker(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "worker")
	out, err := exec.Command("go", "build", "-o", bin, "./internal/cmd/runner").CombinedOutput()
	require.NoError(t, err, "build the runner: %s", out)
	return bin
}

// workerProc is one running runner process.
type workerProc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	lines  []string
	copied chan struct{}
	exited chan struct{}
	err    error
}

func startWorkerProc(t *testing.T, bin, dbURL string, args ...string) *workerProc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+dbURL)
	out, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &workerProc{cmd: cmd, copied: make(chan struct{}), exited: make(chan struct{})}
	go func() {
		defer close(p.copied)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
	}()
	go func() {
		<-p.copied
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("worker %d log:\n%s", cmd.Process.Pid, strings.Join(p.log(), "\n"))
		}
	})
	return p
}

func (p *workerProc) log() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

func (p *workerProc) has(substr string) bool {
	for _, l := range p.log() {
		if strings.Contains(l, substr) {
			return true
		}
	}
	return false
}

// counter reads a "key=N" figure from the worker's last "worker stopped" line.
func (p *workerProc) counter(t *testing.T, key string) int {
	t.Helper()
	re := regexp.MustCompile(`msg="worker stopped".* ` + key + `=(\d+)`)
	for _, l := range p.log() {
		if m := re.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	t.Fatalf("no %s in the worker's log", key)
	return 0
}

// workerID returns the worker_id the worker logged at start.
func (p *workerProc) workerID(t *testing.T) string {
	t.Helper()
	re := regexp.MustCompile(`worker_id=([0-9a-f]{32})`)
	for _, l := range p.log() {
		if m := re.FindStringSubmatch(l); m != nil {
			return m[1]
		}
	}
	t.Fatal("no worker_id in the worker's log")
	return ""
}

func (p *workerProc) waitExit(t *testing.T) (code int) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(waitLimit):
		t.Fatalf("worker did not exit within %v", waitLimit)
	}
	var exitErr *exec.ExitError
	if errors.As(p.err, &exitErr) {
		return exitErr.ExitCode()
	}
	require.NoError(t, p.err)
	return 0
}

func (d db) count(t *testing.T, sql string) int {
	t.Helper()
	var n int
	require.NoError(t, d.pool.QueryRow(ctxT(t), sql).Scan(&n))
	return n
}

// TestManyWorkerProcesses: 4 worker processes start together on a fresh
// table (all creating it and installing triggers at once); 4 producers
// insert 10,000 jobs, some scheduled up to 2 s ahead. Every job runs
// exactly once and no process logs an error. Then one worker is killed
// with SIGKILL mid-run: the others go on, and its stale jobs are put back
// in the queue and run.
func TestManyWorkerProcesses(t *testing.T) {
	d := newDB(t)
	bin := buildWorker(t)
	url := d.with(t, "pool_max_conns", "4")
	var procs []*workerProc
	for range 4 {
		procs = append(procs, startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "4",
			"-job-duration", "0", "-fail-rate", "0", "-poll", "1m", "-stale-after", "2s"))
	}
	for _, p := range procs {
		eventually(t, "worker started", func() bool { return p.has("worker started") })
	}

	const jobs = 10000
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for j := range jobs / 4 / 50 {
				// Batches of 50 rows; every fifth batch is scheduled up to 2 s ahead.
				sql := "INSERT INTO jobs SELECT FROM generate_series(1, 50)"
				if (i+j)%5 == 0 {
					sql = "INSERT INTO jobs (run_at) SELECT now() + random() * interval '2 seconds' FROM generate_series(1, 50)"
				}
				if _, err := d.pool.Exec(ctx, sql); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	lastInsert := time.Now()
	eventually(t, "every job done", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == jobs
	})
	t.Logf("last insert to last job done: %v (includes jobs scheduled up to 2 s ahead)", time.Since(lastInsert).Round(time.Millisecond))
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE attempts_count <> 1"), "every job ran exactly once")
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE run_at > locked_at"), "no job ran early")

	// Kill one worker mid-run with long jobs, then check the others finish everything.
	d.exec(t, "DELETE FROM jobs") // not TRUNCATE: its lock, queued behind a worker's, can deadlock with that worker's next statement
	for _, p := range procs {
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		assert.Equal(t, 0, p.waitExit(t))
	}
	ran := 0
	for _, p := range procs {
		ran += p.counter(t, "ran")
		for _, l := range p.log() {
			assert.NotContains(t, l, "level=ERROR", "worker log")
		}
	}
	assert.Equal(t, jobs, ran, "the workers' own counts")

	procs = procs[:0]
	for range 3 {
		procs = append(procs, startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "4",
			"-job-duration", "200ms", "-fail-rate", "0", "-poll", "1m", "-stale-after", "1s"))
	}
	for _, p := range procs {
		eventually(t, "worker started", func() bool { return p.has("worker started") })
	}
	d.exec(t, "INSERT INTO jobs SELECT FROM generate_series(1, 300)")
	victim := procs[0]
	victimID := victim.workerID(t)
	running := "SELECT count(*) FROM jobs WHERE status = 'job_status_running' AND locked_by = '" + victimID + "'"
	// Each job takes 200ms: stop the victim while it holds some.
	eventually(t, "the victim runs jobs", func() bool { return d.count(t, running) > 0 })
	require.NoError(t, victim.cmd.Process.Signal(syscall.SIGKILL))
	victim.waitExit(t)
	orphans := d.count(t, running)
	t.Logf("the killed worker left %d jobs locked", orphans)
	require.Positive(t, orphans, "the victim was killed holding jobs")
	eventually(t, "the others finish everything, the victim's jobs included", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == 300
	})
	assert.True(t, procs[1].has("put stale jobs back in the queue") || procs[2].has("put stale jobs back in the queue"))
	assert.GreaterOrEqual(t, d.count(t, "SELECT count(*) FROM jobs WHERE attempts_count > 1"), orphans, "the orphans ran again")
	for _, p := range procs[1:] {
		for _, l := range p.log() {
			assert.NotContains(t, l, "level=ERROR", "survivor log")
		}
	}
}

// TestGracefulShutdown: SIGTERM makes a worker stop taking jobs, finish
// the ones running, release its connections and exit 0; a second signal
// exits at once.
func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	bin := buildWorker(t)
	url := d.with(t, "application_name", "jobwatch_graceful")
	p := startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "2", "-job-duration", "500ms", "-fail-rate", "0")
	eventually(t, "worker started", func() bool { return p.has("worker started") })
	d.exec(t, "INSERT INTO jobs SELECT FROM generate_series(1, 10)")
	eventually(t, "two jobs running", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_running'") == 2
	})
	require.Positive(t, d.backends(t, "jobwatch_graceful"), "the worker's connections carry the application name")
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, p.waitExit(t))
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_running'"), "running jobs were finished")
	done := d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'")
	assert.Less(t, done, 10, "no new job was taken after the signal")
	assert.Equal(t, p.counter(t, "ran"), done)
	// A backend ends a moment after its client closes the connection.
	eventually(t, "connections released", func() bool { return d.backends(t, "jobwatch_graceful") == 0 })

	// A second signal: exit now, even with an hour-long job running.
	p2 := startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "1", "-job-duration", "1h", "-fail-rate", "0")
	eventually(t, "worker started", func() bool { return p2.has("worker started") })
	d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	eventually(t, "a job running", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_running'") == 1
	})
	require.NoError(t, p2.cmd.Process.Signal(syscall.SIGTERM))
	eventually(t, "shutdown begun", func() bool { return p2.has("shutting down") })
	require.NoError(t, p2.cmd.Process.Signal(syscall.SIGTERM))
	assert.Equal(t, 1, p2.waitExit(t))
}

// TestThunderingHerd: 16 watching processes; each inserted job wakes all of
// them but runs once. The fetch queries per job stay bounded by the number
// of processes plus one (the winner's look for more).
func TestThunderingHerd(t *testing.T) {
	d := newDB(t)
	bin := buildWorker(t)
	url := d.with(t, "pool_max_conns", "2")
	var procs []*workerProc
	for range 16 {
		procs = append(procs, startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "1",
			"-job-duration", "0", "-fail-rate", "0", "-poll", "1h"))
	}
	for _, p := range procs {
		eventually(t, "worker started", func() bool { return p.has("worker started") })
	}
	const jobs = 20
	for i := range jobs {
		d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
		eventually(t, "job done", func() bool {
			return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == i+1
		})
	}
	fetches := 0
	for _, p := range procs {
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		assert.Equal(t, 0, p.waitExit(t))
		fetches += p.counter(t, "fetches")
	}
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE attempts_count <> 1"), "each job ran once")
	perJob := float64(fetches) / jobs
	t.Logf("thundering herd: %d fetch queries for %d jobs with 16 processes: %.1f per job (start-up fetches included)", fetches, jobs, perJob)
	// Each process fetches at start-up (one wake from its first poll and
	// connect), then at most once per wake-up; the winner looks once more.
	assert.LessOrEqual(t, perJob, float64(16+1)+float64(16*3)/jobs, "bounded by processes + 1 per job")
}

// TestExampleWorker: the README's first command, on a fresh database, runs
// every job and exits 0; SIGTERM in the middle of a run lets the jobs that
// started finish and be recorded.
func TestExampleWorker(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	bin := filepath.Join(t.TempDir(), "example")
	out, err := exec.Command("go", "build", "-o", bin, "./examples/worker").CombinedOutput()
	require.NoError(t, err, "build examples/worker: %s", out)

	p := startWorkerProc(t, bin, d.url, "-enqueue", "20", "-enqueue-later", "5", "-exit-when-idle")
	assert.Equal(t, 0, p.waitExit(t))
	assert.Equal(t, 25, d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'"))

	p = startWorkerProc(t, bin, d.url, "-concurrency", "2")
	eventually(t, "worker started", func() bool { return p.has("worker started") })
	d.exec(t, "INSERT INTO jobs SELECT FROM generate_series(1, 20)")
	eventually(t, "jobs running", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_running'") > 0
	})
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, p.waitExit(t))
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_running'"), "started jobs were recorded")
	assert.Less(t, d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'"), 45, "it stopped fetching")
}

// TestFleetProcesses: runner processes with -fleet (WithFleet); one is
// killed (SIGKILL) and one stopped (SIGSTOP) before the jobs come. Every
// job runs once: the killed one's lock went with its session, and the
// jobs chosen for the stopped one, still a member, are rescued.
func TestFleetProcesses(t *testing.T) {
	t.Parallel()
	d := newDB(t)
	bin := buildWorker(t)
	url := d.with(t, "pool_max_conns", "2")
	var procs []*workerProc
	for range 4 {
		procs = append(procs, startWorkerProc(t, bin, url, "-table", "jobs", "-concurrency", "1",
			"-job-duration", "0", "-fail-rate", "0", "-poll", "1h", "-fleet"))
	}
	for _, p := range procs {
		eventually(t, "worker started", func() bool { return p.has("worker started") })
	}
	presence := `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND objid::int8 = pid
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`
	eventually(t, "every process holds its presence lock", func() bool { return d.count(t, presence) == 4 })
	require.NoError(t, procs[0].cmd.Process.Signal(syscall.SIGKILL))
	<-procs[0].exited
	require.NoError(t, procs[1].cmd.Process.Signal(syscall.SIGSTOP))
	eventually(t, "the killed process's lock is gone", func() bool { return d.count(t, presence) == 3 })
	const jobs = 40
	for range jobs {
		d.exec(t, "INSERT INTO jobs DEFAULT VALUES")
	}
	eventually(t, "every job done", func() bool {
		return d.count(t, "SELECT count(*) FROM jobs WHERE status = 'job_status_succeeded'") == jobs
	})
	assert.Equal(t, 0, d.count(t, "SELECT count(*) FROM jobs WHERE attempts_count <> 1"), "each job ran once")
	require.NoError(t, procs[1].cmd.Process.Signal(syscall.SIGCONT))
	fetches := 0
	for _, p := range procs[1:] {
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		assert.Equal(t, 0, p.waitExit(t))
		fetches += p.counter(t, "fetches")
	}
	assert.Zero(t, procs[1].counter(t, "ran"), "the stopped process ran nothing")
	t.Logf("%d jobs, %d fetch queries by the three processes left", jobs, fetches)
}
