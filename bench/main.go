// Command bench measures jobwatch on a real PostgreSQL and prints every
// figure next to its floor from the same run, with River beside jobwatch
// where the two do the same thing, measured the same way: end to end on
// the client's clock, from the insert call's start to the handler's start,
// one job at a time; and gue (github.com/vgarvardt/gue) woken by jobwatch
// beside gue alone.
//
//	cd bench && go run .               # DATABASE_URL, else pgx's defaults
//	cd bench && go run . -quick        # fewer samples, for a smoke run
//	cd bench && go run . -only e2e,producers
//
// It works in a scratch database it drops at the end. It is a module of its
// own, so that the library never depends on River or gue.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

var (
	quick = flag.Bool("quick", false, "fewer samples, for a smoke run")
	only  = flag.String("only", "", "comma-separated steps: "+strings.Join(stepNames(), ",")+" (default all)")
)

// steps run in this order: the latency figures first, before the bulk steps
// fill the WAL and start checkpoints that would land in their tails.
var steps = []struct {
	name string
	run  func(*bench) error
}{
	{"latency", (*bench).wakeLatency},
	{"e2e", (*bench).endToEnd},
	{"burst", (*bench).burst},
	{"scheduled", (*bench).scheduled},
	{"gue", (*bench).gueLatency},
	{"producers", (*bench).producers},
	{"consumer", (*bench).consumerProducers},
	{"jobtable", (*bench).jobTableProducers},
	{"fanin", (*bench).fanIn},
	{"fleet", (*bench).fleet},
	{"poll", (*bench).pollCost},
	{"bulk", (*bench).bulkInsert},
}

func stepNames() []string {
	var names []string
	for _, s := range steps {
		names = append(names, s.name)
	}
	return names
}

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx := context.Background()
	b, done, err := newBench(ctx)
	if err != nil {
		return err
	}
	defer done()
	for _, step := range steps {
		if *only != "" && !slices.Contains(strings.Split(*only, ","), step.name) {
			continue
		}
		fmt.Fprintf(os.Stderr, "%s...\n", step.name)
		_, _ = b.pool.Exec(ctx, "CHECKPOINT") // each step from a quiet disk (a superuser's right; else skipped)
		if err := step.run(b); err != nil {
			return fmt.Errorf("%s: %w", step.name, err)
		}
	}
	var version string
	_ = b.pool.QueryRow(ctx, "SHOW server_version").Scan(&version)
	fmt.Printf("Run %s: PostgreSQL %s, %d CPUs, Go %s.\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), version, runtime.NumCPU(), runtime.Version())
	fmt.Println("| figure | jobwatch | floor or River (same run) | ratio | goal |")
	fmt.Println("|---|---|---|---|---|")
	for _, r := range b.rows {
		fmt.Printf("| %s | %s | %s | %s | %s |\n", r.figure, r.jobwatch, r.floor, r.ratio, r.goal)
	}
	return nil
}

// bench is one run: a scratch database and the rows measured so far.
type bench struct {
	ctx   context.Context
	url   string // the scratch database
	pool  *pgxpool.Pool
	quiet jobwatch.Option
	log   *slog.Logger // for the library and River: errors only
	rows  []row
}

type row struct{ figure, jobwatch, floor, ratio, goal string }

func (b *bench) report(r row) {
	b.rows = append(b.rows, r)
	fmt.Fprintf(os.Stderr, "  %s: %s | %s | %s\n", r.figure, r.jobwatch, r.floor, r.ratio)
}

// samples returns full, or quick under -quick.
func samples(full, quickN int) int {
	if *quick {
		return quickN
	}
	return full
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
