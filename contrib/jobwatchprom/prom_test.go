package jobwatchprom_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/contrib/jobwatchprom"
	"github.com/jobwatch-go/jobwatch/jobwatchtest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMain(m *testing.M) { jobwatchtest.Main(m) }

// TestCollector: a real watch woken by a real INSERT, scraped over HTTP as
// Prometheus does; the values are the watch's and the Listener's.
func TestCollector(t *testing.T) {
	pool := jobwatchtest.NewDatabase(t)
	jobwatchtest.CreateJobTable(t, pool, "jobs")
	l, err := jobwatch.NewListener(pool.Config().ConnString(), jobwatch.WithDeliveryCheck(100*time.Millisecond, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	wake := make(chan jobwatch.Message, 10)
	w, err := jobwatch.WatchForJob(context.Background(), pool, l, "jobs", time.Hour, wake)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	c := jobwatchprom.NewCollector(l)
	c.Add(w)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)

	if _, err := pool.Exec(context.Background(), "INSERT INTO jobs DEFAULT VALUES"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-wake:
	case <-time.After(15 * time.Second):
		t.Fatal("not woken")
	}
	deadline := time.Now().Add(15 * time.Second)
	for l.Stats().DeliveryProbes < 2 || w.Stats().Wakeups.Notification < 1 {
		if time.Now().After(deadline) {
			t.Fatal("no probe, or the wake-up not counted")
		}
		time.Sleep(10 * time.Millisecond)
	}

	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	page := string(body)
	for _, want := range []string{
		"jobwatch_listener_connected 1",
		`jobwatch_notifications_working{table="jobs"} 1`,
		`jobwatch_wakeups_total{cause="notification",table="jobs"} 1`,
		`jobwatch_poll_interval_seconds{table="jobs"} 3600`,
		"jobwatch_notify_queue_usage_ratio ",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("the scrape lacks %q:\n%s", want, page)
		}
	}
	if got := metricValue(t, reg, "jobwatch_delivery_probes_total"); got < 2 {
		t.Errorf("delivery probes %v, want at least 2", got)
	}
	// The queue is the server's: other sessions' notifications are in it.
	if got := metricValue(t, reg, "jobwatch_notify_queue_usage_ratio"); got < 0 || got >= 0.5 {
		t.Errorf("notification queue usage %v, want a fraction well below 0.5", got)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP jobwatch_notifications_total Notifications on the table's channel.
# TYPE jobwatch_notifications_total counter
jobwatch_notifications_total{table="jobs"} 1
`), "jobwatch_notifications_total"); err != nil {
		t.Error(err)
	}
	if got := testutil.CollectAndCount(c); got < 20 {
		t.Errorf("%d metrics collected, want the Listener's and the watch's", got)
	}
}

// metricValue gathers g and returns the value of name, a counter or a
// gauge with one series.
func metricValue(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			m := f.GetMetric()[0]
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
