package jobwatchotel_test

import (
	"context"
	"testing"
	"time"

	"github.com/jobwatch-go/jobwatch"
	"github.com/jobwatch-go/jobwatch/contrib/jobwatchotel"
	"github.com/jobwatch-go/jobwatch/jobwatchtest"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

func TestMain(m *testing.M) { jobwatchtest.Main(m) }

// TestMetrics: a real watch woken by a real INSERT, read through the SDK's
// manual reader, as an exporter reads it.
func TestMetrics(t *testing.T) {
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
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer provider.Shutdown(context.Background())
	m, err := jobwatchotel.New(provider, l)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.Add(w)

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

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]map[attribute.Distinct]float64{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != jobwatchotel.Scope {
			continue
		}
		for _, mt := range sm.Metrics {
			got[mt.Name] = map[attribute.Distinct]float64{}
			var points []metricdata.DataPoint[float64]
			switch d := mt.Data.(type) {
			case metricdata.Sum[float64]:
				points = d.DataPoints
			case metricdata.Gauge[float64]:
				points = d.DataPoints
			}
			for _, p := range points {
				got[mt.Name][p.Attributes.Equivalent()] = p.Value
			}
		}
	}
	one := func(name string, kv ...attribute.KeyValue) float64 {
		t.Helper()
		set := attribute.NewSet(kv...)
		v, ok := got[name][set.Equivalent()]
		if !ok {
			t.Fatalf("no %s %v; got %v", name, kv, got[name])
		}
		return v
	}
	table := attribute.String("jobwatch.table", "jobs")
	if v := one("jobwatch.listener.connected"); v != 1 {
		t.Errorf("connected %v", v)
	}
	if v := one("jobwatch.delivery.probes"); v < 2 {
		t.Errorf("probes %v", v)
	}
	if v := one("jobwatch.wakeups", table, attribute.String("jobwatch.cause", "notification")); v != 1 {
		t.Errorf("wake-ups by notification %v", v)
	}
	if v := one("jobwatch.notifications", table); v != 1 {
		t.Errorf("notifications %v", v)
	}
	if v := one("jobwatch.poll.interval", table); v != 3600 {
		t.Errorf("poll interval %v", v)
	}
	if v := one("jobwatch.notifications.working", table); v != 1 {
		t.Errorf("working %v", v)
	}
	if len(got) != 18 {
		t.Errorf("%d instruments reported, want 18", len(got))
	}
}
