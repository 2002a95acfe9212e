package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// The fleet: many worker processes, each internal/cmd/runner (the tuned
// runner) watching fleetTables tables with one Listener and a pool of
// three connections, on a scratch cluster of its own (a fleet needs more
// connections than a default server allows).
const (
	fleetTables    = 10
	fleetRate      = 50 // jobs a second, spread over the tables, while measured under load
	fleetInserters = 4  // connections inserting them
)

// fleet measures, for the whole fleet: the queries it sends while idle,
// the fetch queries per job and the commit-to-fetch latency under a
// steady insert rate; each with the gate on and off, next to one process
// doing the same (its floor); the same fleet with all processes but one
// listening only (woken, never fetching), which says what of the fleet's
// latency is the herd's fetches and what is waking every process; and one
// process's idle queries watching 1 and 20 tables.
func (b *bench) fleet() error {
	procs := samples(32, 8)
	dir, err := os.MkdirTemp("", "jobwatch-bench-fleet")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "runner")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/jobwatch-go/jobwatch/internal/cmd/runner").CombinedOutput(); err != nil {
		return fmt.Errorf("build the runner: %v: %s", err, out)
	}
	cluster, err := pgtest.NewCluster("max_connections=600")
	if err != nil {
		return err
	}
	defer cluster.Remove()
	url := cluster.URL("postgres")
	admin, err := pgxpool.New(b.ctx, url)
	if err != nil {
		return err
	}
	defer admin.Close()

	type result struct {
		idle         float64 // queries a second, the whole fleet
		fetchesPerJ  float64
		p50, p99     time.Duration
		jobs         int
		rate         float64 // jobs inserted a second: at most fleetRate, less when the machine is busy
		notification uint64
		max          time.Duration // the longest commit to fetch
		rescues      uint64        // WithFleet: wake-ups for jobs the chosen process did not take
	}
	// fleetCase is what one measurement runs: procs processes watching
	// tables tables, the first listening of them only listening (they
	// take the wake-ups and never fetch: the herd-free control); idle
	// and load say what is measured.
	type fleetCase struct {
		procs, tables, listening int
		gate, idle, load         bool
		fleet                    bool // WithFleet
		// kill and stall processes are killed (SIGKILL) and stopped
		// (SIGSTOP) a third into the load, the fleet's fetch counts then
		// unread.
		kill, stall int
	}
	measure := func(c fleetCase) (result, error) {
		var r result
		names := make([]string, c.tables)
		for i := range names {
			names[i] = fmt.Sprintf("fleet_%d", i)
			if _, err := admin.Exec(b.ctx, "DROP TABLE IF EXISTS "+names[i]+"; "+jobwatch.CreateJobTableSQL(names[i])); err != nil {
				return r, err
			}
			if _, err := admin.Exec(b.ctx, jobwatch.CreateNotificationTriggerSQLWith(names[i], jobwatch.WithNotifyGate(c.gate))); err != nil {
				return r, err
			}
		}
		f, err := startFleet(bin, url, c.procs, names, c.gate, c.listening, c.fleet)
		if err != nil {
			return r, err
		}
		defer f.stop()
		time.Sleep(2 * time.Second) // start-up done: first polls, the first probes
		before, err := f.snapshot()
		if err != nil {
			return r, err
		}
		after := before
		if c.idle {
			idle := time.Duration(samples(10, 3)) * time.Second
			time.Sleep(idle)
			if after, err = f.snapshot(); err != nil {
				return r, err
			}
			r.idle = float64(after.queries()-before.queries()) / idle.Seconds()
		}
		if !c.load {
			return r, nil
		}
		// fleetInserters connections insert on a fixed schedule, each
		// catching up when an INSERT took longer than its turn, so that
		// every configuration is measured at the same rate.
		start := time.Now()
		deadline := start.Add(time.Duration(samples(10, 3)) * time.Second)
		var inserted atomic.Int64
		errs := make([]error, fleetInserters)
		var wg sync.WaitGroup
		if c.kill+c.stall > 0 {
			wg.Go(func() {
				time.Sleep(time.Until(start.Add(deadline.Sub(start) / 3)))
				f.disturb(c.kill, c.stall)
			})
		}
		for k := range fleetInserters {
			wg.Go(func() {
				for i := k; ; i += fleetInserters {
					at := start.Add(time.Duration(i) * time.Second / fleetRate)
					if !at.Before(deadline) {
						return
					}
					time.Sleep(time.Until(at))
					if _, err := admin.Exec(b.ctx, "INSERT INTO "+names[rand.N(len(names))]+" DEFAULT VALUES"); err != nil {
						errs[k] = err
						return
					}
					inserted.Add(1)
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return r, err
		}
		r.jobs = int(inserted.Load())
		r.rate = float64(r.jobs) / time.Since(start).Seconds()
		union := make([]string, len(names))
		for i, t := range names {
			union[i] = "SELECT status::text, extract(epoch FROM locked_at - created_at)::float8 AS lat FROM " + t
		}
		all := strings.Join(union, " UNION ALL ")
		if err := waitUntil(time.Minute, "every job fetched", func() bool {
			var left int
			err := admin.QueryRow(b.ctx, "SELECT count(*) FROM ("+all+") j WHERE status = 'job_status_not_started'").Scan(&left)
			return err == nil && left == 0
		}); err != nil {
			return r, err
		}
		if c.kill+c.stall == 0 {
			done, err := f.snapshot()
			if err != nil {
				return r, err
			}
			r.fetchesPerJ = float64(done.Fetches-after.Fetches) / float64(r.jobs)
			r.notification = done.Notifications - after.Notifications
			r.rescues = done.Rescues - after.Rescues
		}
		rows, err := admin.Query(b.ctx, "SELECT lat FROM ("+all+") j")
		if err != nil {
			return r, err
		}
		var lat []time.Duration
		for rows.Next() {
			var secs float64
			if err := rows.Scan(&secs); err != nil {
				rows.Close()
				return r, err
			}
			lat = append(lat, time.Duration(secs*float64(time.Second)))
		}
		rows.Close()
		r.p50, r.p99, r.max = percentile(lat, 50), percentile(lat, 99), percentile(lat, 100)
		return r, rows.Err()
	}

	one, err := measure(fleetCase{procs: 1, tables: fleetTables, gate: true, idle: true, load: true})
	if err != nil {
		return err
	}
	on, err := measure(fleetCase{procs: procs, tables: fleetTables, gate: true, idle: true, load: true})
	if err != nil {
		return err
	}
	oneOff, err := measure(fleetCase{procs: 1, tables: fleetTables, load: true})
	if err != nil {
		return err
	}
	off, err := measure(fleetCase{procs: procs, tables: fleetTables, idle: true, load: true})
	if err != nil {
		return err
	}
	// The herd's share: the whole fleet fetching, against the same fleet
	// with all processes but one listening only, interleaved, since one
	// run of each moves with the machine's noise.
	var all, quiet, shared []result
	for range samples(3, 1) {
		a, err := measure(fleetCase{procs: procs, tables: fleetTables, gate: true, load: true})
		if err != nil {
			return err
		}
		q, err := measure(fleetCase{procs: procs, tables: fleetTables, gate: true, load: true, listening: procs - 1})
		if err != nil {
			return err
		}
		s, err := measure(fleetCase{procs: procs, tables: fleetTables, gate: true, load: true, fleet: true})
		if err != nil {
			return err
		}
		all, quiet, shared = append(all, a), append(quiet, q), append(shared, s)
	}
	// WithFleet at other sizes, each next to the same fleet fetching
	// without it and to the listen-only control, one run each.
	type sized struct {
		procs                int
		shared, herd, listen result
	}
	var sizes []sized
	for _, n := range []int{samples(8, 4), samples(64, 0)} {
		if n == 0 {
			continue
		}
		var z sized
		z.procs = n
		if z.herd, err = measure(fleetCase{procs: n, tables: fleetTables, gate: true, load: true}); err != nil {
			return err
		}
		if z.listen, err = measure(fleetCase{procs: n, tables: fleetTables, gate: true, load: true, listening: n - 1}); err != nil {
			return err
		}
		if z.shared, err = measure(fleetCase{procs: n, tables: fleetTables, gate: true, load: true, fleet: true}); err != nil {
			return err
		}
		sizes = append(sizes, z)
	}
	// Chosen processes that fail: of 8 (4 under -quick) with WithFleet, a
	// quarter killed and a quarter stopped a third into the load.
	small := samples(8, 4)
	calm, err := measure(fleetCase{procs: small, tables: fleetTables, gate: true, idle: true, load: true, fleet: true})
	if err != nil {
		return err
	}
	hurt, err := measure(fleetCase{procs: small, tables: fleetTables, gate: true, load: true, fleet: true, kill: small / 4, stall: small / 4})
	if err != nil {
		return err
	}
	t1, err := measure(fleetCase{procs: 1, tables: 1, gate: true, idle: true})
	if err != nil {
		return err
	}
	t20, err := measure(fleetCase{procs: 1, tables: 20, gate: true, idle: true})
	if err != nil {
		return err
	}
	fleet := fmt.Sprintf("fleet of %d processes x %d tables", procs, fleetTables)
	b.report(row{fleet + ", idle: queries per second, all processes (the gate on)", fmt.Sprintf("%.1f q/s", on.idle),
		fmt.Sprintf("%.1f q/s (the gate off: health and delivery checks only)", off.idle), ratio(on.idle, off.idle),
		"flat in the number of tables"})
	b.report(row{"one process idle, watching 1 table / 20 tables (the gate on)", fmt.Sprintf("%.1f q/s (20 tables)", t20.idle),
		fmt.Sprintf("%.1f q/s (1 table)", t1.idle), ratio(t20.idle, t1.idle), "1x"})
	for _, c := range []struct {
		gate      string
		fleet, pr result
	}{{"on", on, one}, {"off", off, oneOff}} {
		b.report(row{fmt.Sprintf("%s, %d jobs at %.0f/s (%d inserters aiming at %d/s), the gate %s: fetch queries per job (the herd)", fleet, c.fleet.jobs, c.fleet.rate, fleetInserters, fleetRate, c.gate),
			fmt.Sprintf("%.1f", c.fleet.fetchesPerJ), fmt.Sprintf("%.1f (one process)", c.pr.fetchesPerJ),
			ratio(c.fleet.fetchesPerJ, c.pr.fetchesPerJ), ""})
		b.report(row{fmt.Sprintf("same, commit to fetch p50 / p99 (server clock, %d notifications)", c.fleet.notification),
			ms(c.fleet.p50) + " / " + ms(c.fleet.p99), ms(c.pr.p50) + " / " + ms(c.pr.p99) + " (one process)",
			ratio(float64(c.fleet.p99), float64(c.pr.p99)), ""})
	}
	med := func(rs []result, p func(result) time.Duration) time.Duration {
		d := make([]time.Duration, len(rs))
		for i, r := range rs {
			d[i] = p(r)
		}
		return percentile(d, 50)
	}
	p50 := func(r result) time.Duration { return r.p50 }
	p99 := func(r result) time.Duration { return r.p99 }
	fetches := func(rs []result) float64 {
		sum := 0.0
		for _, r := range rs {
			sum += r.fetchesPerJ
		}
		return sum / float64(len(rs))
	}
	b.report(row{fmt.Sprintf("%s, the gate on, %d of them listening only (woken, never fetching), %d runs interleaved with the whole fleet fetching: fetch queries per job", fleet, procs-1, len(all)),
		fmt.Sprintf("%.1f", fetches(quiet)), fmt.Sprintf("%.1f (all %d fetching)", fetches(all), procs),
		ratio(fetches(quiet), fetches(all)), ""})
	b.report(row{"same, commit to fetch p50 / p99, median of the runs",
		ms(med(quiet, p50)) + " / " + ms(med(quiet, p99)), ms(med(all, p50)) + " / " + ms(med(all, p99)) + fmt.Sprintf(" (all %d fetching)", procs),
		ratio(float64(med(quiet, p99)), float64(med(all, p99))), ""})
	// WithFleet: one process woken per job.
	b.report(row{fmt.Sprintf("%s, the gate on, WithFleet (one process woken per job), %d runs interleaved with the two above: fetch queries per job", fleet, len(shared)),
		fmt.Sprintf("%.2f", fetches(shared)), fmt.Sprintf("%.1f (all %d fetching); %.2f (one process)", fetches(all), procs, one.fetchesPerJ),
		ratio(fetches(shared), one.fetchesPerJ), "at most 1.5"})
	b.report(row{"same, commit to fetch p50 / p99, median of the runs",
		ms(med(shared, p50)) + " / " + ms(med(shared, p99)),
		fmt.Sprintf("%s (one process); %s (%d listening only)", ms(one.p99), ms(med(quiet, p99)), procs-1),
		ratio(float64(med(shared, p99)), float64(one.p99)), "at most 2x one process"})
	for _, z := range sizes {
		b.report(row{fmt.Sprintf("fleet of %d processes x %d tables, the gate on, WithFleet: fetch queries per job", z.procs, fleetTables),
			fmt.Sprintf("%.2f", z.shared.fetchesPerJ), fmt.Sprintf("%.1f (all %d fetching); %.2f (one process)", z.herd.fetchesPerJ, z.procs, one.fetchesPerJ),
			ratio(z.shared.fetchesPerJ, one.fetchesPerJ), "at most 1.5"})
		b.report(row{"same, commit to fetch p50 / p99",
			ms(z.shared.p50) + " / " + ms(z.shared.p99),
			fmt.Sprintf("%s (one process); %s (all fetching); %s (%d listening only)", ms(one.p99), ms(z.herd.p99), ms(z.listen.p99), z.procs-1),
			ratio(float64(z.shared.p99), float64(one.p99)), "at most 2x one process"})
	}
	b.report(row{fmt.Sprintf("fleet of %d processes x %d tables, WithFleet, idle: queries per second per process (the gate on; its check and the fleet's)", small, fleetTables),
		fmt.Sprintf("%.1f q/s", calm.idle/float64(small)), fmt.Sprintf("%.1f q/s (without WithFleet, fleet of %d)", on.idle/float64(procs), procs),
		ratio(calm.idle/float64(small), on.idle/float64(procs)), ""})
	b.report(row{fmt.Sprintf("fleet of %d, WithFleet, %d killed (SIGKILL) and %d stopped (SIGSTOP) a third into the load, %d jobs: longest commit to fetch, p99", small, small/4, small/4, hurt.jobs),
		ms(hurt.max) + ", p99 " + ms(hurt.p99), ms(calm.max) + ", p99 " + ms(calm.p99) + " (none disturbed)",
		ratio(float64(hurt.max), float64(calm.max)), "no job waits more than 1s"})
	return nil
}

// fleetProcs is a running fleet.
type fleetProcs struct {
	procs []*exec.Cmd
	lines []chan string // each process's stdout, a JSON line per snapshot
	logs  []*strings.Builder
	mu    sync.Mutex
}

// fleetStats is what a runner process prints on SIGUSR1, summed.
type fleetStats struct {
	ListenerQueries, WatchQueries, Notifications, Polls, Fetches, Ran, Rescues uint64
}

func (s fleetStats) queries() uint64 { return s.ListenerQueries + s.WatchQueries }

// startFleet starts n runner processes watching tables, the first
// listening of them with -listen-only, all -fleet with fleet.
func startFleet(bin, url string, n int, tables []string, gate bool, listening int, fleet bool) (*fleetProcs, error) {
	dsn, err := pgtest.WithParam(url, "pool_max_conns", "3")
	if err != nil {
		return nil, err
	}
	f := &fleetProcs{}
	ready := make(chan struct{}, n*len(tables))
	for i := range n {
		cmd := exec.Command(bin, "-table", strings.Join(tables, ","), "-concurrency", "2", "-poll", "1m",
			"-job-duration", "0", "-fail-rate", "0", fmt.Sprintf("-gate=%v", gate), fmt.Sprintf("-listen-only=%v", i < listening),
			fmt.Sprintf("-fleet=%v", fleet))
		cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			f.stop()
			return nil, err
		}
		stderr, err := cmd.StderrPipe()
		if err != nil {
			f.stop()
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			f.stop()
			return nil, err
		}
		lines := make(chan string, 16)
		log := &strings.Builder{}
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		go func() {
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				f.mu.Lock()
				log.WriteString(sc.Text() + "\n")
				f.mu.Unlock()
				if strings.Contains(sc.Text(), `msg="worker started"`) {
					ready <- struct{}{}
				}
			}
		}()
		f.procs = append(f.procs, cmd)
		f.lines = append(f.lines, lines)
		f.logs = append(f.logs, log)
	}
	timeout := time.After(time.Minute)
	for range n * len(tables) {
		select {
		case <-ready:
		case <-timeout:
			f.stop()
			return nil, fmt.Errorf("the fleet did not start within a minute")
		}
	}
	return f, nil
}

// snapshot asks every process for its counts and sums them.
func (f *fleetProcs) snapshot() (fleetStats, error) {
	var sum fleetStats
	for _, p := range f.procs {
		if err := p.Process.Signal(syscall.SIGUSR1); err != nil {
			return sum, err
		}
	}
	for i, lines := range f.lines {
		select {
		case line := <-lines:
			var s fleetStats
			if err := json.Unmarshal([]byte(line), &s); err != nil {
				return sum, fmt.Errorf("process %d: %q: %w", i, line, err)
			}
			sum.ListenerQueries += s.ListenerQueries
			sum.WatchQueries += s.WatchQueries
			sum.Notifications += s.Notifications
			sum.Polls += s.Polls
			sum.Fetches += s.Fetches
			sum.Ran += s.Ran
			sum.Rescues += s.Rescues
		case <-time.After(10 * time.Second):
			return sum, fmt.Errorf("process %d did not report; its log:\n%s", i, f.logs[i].String())
		}
	}
	return sum, nil
}

// disturb kills the first kill processes and stops the next stall ones;
// stop lets them go on before it ends them.
func (f *fleetProcs) disturb(kill, stall int) {
	for i, p := range f.procs {
		switch {
		case i < kill:
			_ = p.Process.Signal(syscall.SIGKILL)
		case i < kill+stall:
			_ = p.Process.Signal(syscall.SIGSTOP)
		}
	}
}

func (f *fleetProcs) stop() {
	for _, p := range f.procs {
		_ = p.Process.Signal(syscall.SIGCONT)
		_ = p.Process.Signal(syscall.SIGTERM)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, p := range f.procs {
		done := make(chan struct{})
		go func() { _ = p.Wait(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			_ = p.Process.Kill()
			<-done
		}
	}
}
