package main

import (
	"fmt"
	"time"

	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// fanIn: 100 tables watched by one process use one LISTEN connection.
func (b *bench) fanIn() error {
	url, err := pgtest.WithParam(b.url, "application_name", "jobwatch_bench_fanin")
	if err != nil {
		return err
	}
	l, err := jobwatch.NewListener(url, b.quiet)
	if err != nil {
		return err
	}
	defer l.Close()
	const tables = 100
	wake := make(chan jobwatch.Message, 2*tables)
	for i := range tables {
		t := fmt.Sprintf("fan_%d", i)
		if err := b.jobTable(t); err != nil {
			return err
		}
		w, err := b.watch(l, t, wake)
		if err != nil {
			return err
		}
		defer w.Close()
	}
	for i := range tables {
		if err := b.exec(fmt.Sprintf("INSERT INTO fan_%d DEFAULT VALUES", i)); err != nil {
			return err
		}
	}
	for got := 0; got < tables; got++ {
		select {
		case <-wake:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("%d of %d tables woken", got, tables)
		}
	}
	var conns int
	if err := b.pool.QueryRow(b.ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobwatch_bench_fanin'").Scan(&conns); err != nil {
		return err
	}
	b.report(row{fmt.Sprintf("fan-in: %d tables watched by one process", tables),
		fmt.Sprintf("%d LISTEN connection(s), %d of %d woken", conns, tables, tables), "", "", "one connection"})
	return nil
}
