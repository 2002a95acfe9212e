package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// floor is the bare pgx LISTEN on a plain row trigger: what PostgreSQL
// itself costs from an INSERT's start to its notification's arrival.
type floor struct {
	conn *pgx.Conn
	got  chan struct{}
	stop func()
}

func (b *bench) newFloor() (*floor, error) {
	if err := b.exec(jobwatch.CreateJobTableSQL("bare_jobs")); err != nil {
		return nil, err
	}
	if err := b.exec("DROP TRIGGER IF EXISTS notify_bare_jobs ON bare_jobs"); err != nil {
		return nil, err
	}
	if err := b.exec(ihpTriggers("bare_jobs", "bare")); err != nil {
		return nil, err
	}
	conn, err := pgx.Connect(b.ctx, b.url)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(b.ctx, "LISTEN bare"); err != nil {
		conn.Close(b.ctx)
		return nil, err
	}
	f := &floor{conn: conn, got: make(chan struct{}, 16)}
	ctx, cancel := context.WithCancel(b.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, err := conn.WaitForNotification(ctx); err != nil {
				return
			}
			f.got <- struct{}{}
		}
	}()
	f.stop = func() {
		cancel()
		<-done
		conn.Close(context.Background())
	}
	return f, nil
}

// once times one INSERT on conn to its notification.
func (f *floor) once(ctx context.Context, conn *pgxpool.Conn) (time.Duration, error) {
	t0 := time.Now()
	if _, err := conn.Exec(ctx, "INSERT INTO bare_jobs DEFAULT VALUES"); err != nil {
		return 0, err
	}
	select {
	case <-f.got:
		return time.Since(t0), nil
	case <-time.After(5 * time.Second):
		return 0, fmt.Errorf("no notification from the bare trigger")
	}
}

// wakeLatency: a lone INSERT's start to JobAvailable on the caller's
// channel, with jobwatch's default (gated) triggers, interleaved with the
// bare floor. One INSERT at a time: one lone insert must not pay for the
// gate.
func (b *bench) wakeLatency() error {
	if err := b.jobTable("jobs"); err != nil {
		return err
	}
	f, err := b.newFloor()
	if err != nil {
		return err
	}
	defer f.stop()
	l, err := jobwatch.NewListener(b.url, b.quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 16)
	w, err := b.watch(l, "jobs", wake)
	if err != nil {
		return err
	}
	defer w.Close()
	conn, err := b.pool.Acquire(b.ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	n := samples(1000, 200)
	var jw, bare []time.Duration
	for range n {
		t0 := time.Now()
		if _, err := conn.Exec(b.ctx, "INSERT INTO jobs DEFAULT VALUES"); err != nil {
			return err
		}
		select {
		case <-wake:
			jw = append(jw, time.Since(t0))
		case <-time.After(5 * time.Second):
			return fmt.Errorf("no wake-up")
		}
		d, err := f.once(b.ctx, conn)
		if err != nil {
			return err
		}
		bare = append(bare, d)
	}
	for _, p := range []float64{50, 99} {
		a, fl := percentile(jw, p), percentile(bare, p)
		goal := ""
		if p == 99 {
			goal = "at most 1.3x"
		}
		b.report(row{fmt.Sprintf("wake latency p%.0f, lone INSERTs (%d, one at a time)", p, n), ms(a),
			ms(fl) + " (bare LISTEN, row trigger)", ratio(float64(a), float64(fl)), goal})
	}
	return nil
}
