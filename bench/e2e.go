package main

import (
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// endToEnd: as graphile-worker and River were measured, one job at a time
// (the next inserted once the previous one's handler started), on this
// process's clock, from the insert call's start to the handler's start,
// with the worker's sessions' synchronous_commit on and off; next to the
// bare LISTEN floor, and River with its defaults and its fastest setting.
func (b *bench) endToEnd() error {
	f, err := b.newFloor()
	if err != nil {
		return err
	}
	defer f.stop()
	n := samples(1000, 200)
	for _, syncCommit := range []string{"on", "off"} {
		jw, bare, err := b.jobwatchClosedLoop("e2e_"+syncCommit, syncCommit, n, f)
		if err != nil {
			return err
		}
		var rv [][]time.Duration
		for _, rc := range riverConfigs {
			// River's defaults wait up to 100 ms between fetches: fewer jobs.
			m := n
			if rc.cooldown == 0 {
				m = samples(200, 50)
			}
			d, err := b.riverClosedLoop(syncCommit, rc.cooldown, m)
			if err != nil {
				return err
			}
			rv = append(rv, d)
		}
		for _, p := range []float64{50, 99} {
			a := percentile(jw, p)
			goal := ""
			if p == 99 {
				goal = "at most 2x the floor's p99"
			}
			b.report(row{fmt.Sprintf("end to end p%.0f, insert to handler start (%d, one at a time), worker synchronous_commit %s", p, n, syncCommit),
				ms(a), ms(percentile(bare, p)) + " (bare LISTEN)", ratio(float64(a), float64(percentile(bare, p))), goal})
			for i, rc := range riverConfigs {
				r := percentile(rv[i], p)
				b.report(row{fmt.Sprintf("  same, %s (%d jobs)", rc.name, len(rv[i])), ms(a), ms(r) + " (" + rc.name + ")", ratio(float64(a), float64(r)), ""})
			}
		}
	}
	return nil
}

// jobwatchClosedLoop inserts n jobs one at a time into table, each once the
// previous one's handler started, and returns each insert-to-start time,
// with a sample of the floor f taken after each job, so that the machine's
// noise falls on both alike.
func (b *bench) jobwatchClosedLoop(table, syncCommit string, n int, f *floor) (jw, bare []time.Duration, err error) {
	if err := b.jobTable(table); err != nil {
		return nil, nil, err
	}
	starts := make(chan start, concurrency)
	stop, err := b.jobwatchWorker(table, syncCommit, func(s start) { starts <- s })
	if err != nil {
		return nil, nil, err
	}
	defer stop()
	conn, err := b.pool.Acquire(b.ctx)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Release()
	for range n {
		t0 := time.Now()
		var id pgtype.UUID
		if err := conn.QueryRow(b.ctx, "INSERT INTO "+table+" DEFAULT VALUES RETURNING id").Scan(&id); err != nil {
			return nil, nil, err
		}
		s, err := awaitStart(starts, id.Bytes)
		if err != nil {
			return nil, nil, err
		}
		jw = append(jw, s.at.Sub(t0))
		d, err := f.once(b.ctx, conn)
		if err != nil {
			return nil, nil, err
		}
		bare = append(bare, d)
	}
	return jw, bare, nil
}

// riverClosedLoop is jobwatchClosedLoop for River.
func (b *bench) riverClosedLoop(syncCommit string, cooldown time.Duration, n int) ([]time.Duration, error) {
	starts := make(chan start, concurrency)
	client, stop, err := b.riverWorker(syncCommit, cooldown, func(s start) { starts <- s })
	if err != nil {
		return nil, err
	}
	defer stop()
	var out []time.Duration
	for i := range n {
		t0 := time.Now()
		if _, err := client.Insert(b.ctx, benchArgs{Seq: int64(i)}, nil); err != nil {
			return nil, err
		}
		s, err := awaitStart(starts, seqKey(int64(i)))
		if err != nil {
			return nil, err
		}
		out = append(out, s.at.Sub(t0))
	}
	return out, nil
}

// awaitStart waits for the start of job id.
func awaitStart(starts <-chan start, id [16]byte) (start, error) {
	timeout := time.After(30 * time.Second)
	for {
		select {
		case s := <-starts:
			if s.id == id {
				return s, nil
			}
		case <-timeout:
			return start{}, fmt.Errorf("job not started within 30s")
		}
	}
}
