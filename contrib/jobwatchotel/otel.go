// Package jobwatchotel exports jobwatch's Stats as OpenTelemetry metrics:
// observable counters and gauges, read from a Listener and its watches at
// each collection, on a meter of an injected MeterProvider. It is a module
// of its own, so that jobwatch does not depend on OpenTelemetry.
//
//	m, err := jobwatchotel.New(meterProvider, listener)
//	if err != nil { ... }
//	defer m.Close()
//	m.Add(watch)
//
// The instruments are those of the Prometheus collector
// (contrib/jobwatchprom), named jobwatch.<name> with OpenTelemetry's
// conventions: jobwatch.listener.connected, jobwatch.listener.connects,
// jobwatch.listener.notifications, jobwatch.listener.queries,
// jobwatch.delivery.probes, jobwatch.delivery.probes_lost,
// jobwatch.delivery.round_trip (s), jobwatch.notify_queue.usage, and, with a
// jobwatch.table attribute, jobwatch.notifications,
// jobwatch.notifications.working, jobwatch.wakeups (with jobwatch.cause:
// notification, poll, scheduled, gate, reconnect, rescue), jobwatch.wakeups.dropped,
// jobwatch.polls, jobwatch.poll.errors, jobwatch.poll.time (s),
// jobwatch.poll.interval (s), jobwatch.queries and
// jobwatch.trigger.repairs.
package jobwatchotel

import (
	"context"
	"errors"
	"sync"

	"github.com/jobwatch-go/jobwatch"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Scope is the instrumentation scope of the meter the instruments are on.
const Scope = "github.com/jobwatch-go/jobwatch/contrib/jobwatchotel"

// Metrics are the instruments of one Listener and the watches added. Safe
// for concurrent use.
type Metrics struct {
	listener *jobwatch.Listener
	reg      metric.Registration

	mu      sync.Mutex
	watches map[*jobwatch.Watch]bool
}

// New registers the instruments on provider's meter Scope and returns
// them; listener may be nil (watches only). Close unregisters them.
func New(provider metric.MeterProvider, listener *jobwatch.Listener) (*Metrics, error) {
	if provider == nil {
		return nil, errors.New("jobwatchotel: nil MeterProvider")
	}
	m := &Metrics{listener: listener, watches: map[*jobwatch.Watch]bool{}}
	meter := provider.Meter(Scope)
	var errs []error
	counter := func(name, unit, desc string) metric.Float64ObservableCounter {
		c, err := meter.Float64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	gauge := func(name, unit, desc string) metric.Float64ObservableGauge {
		g, err := meter.Float64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return g
	}
	in := instruments{
		connected:      gauge("jobwatch.listener.connected", "1", "1 while the Listener's connection is up and listening."),
		connects:       counter("jobwatch.listener.connects", "{connect}", "Successful connects of the Listener, the first included."),
		lnotifications: counter("jobwatch.listener.notifications", "{notification}", "Notifications the Listener received for subscribed channels."),
		lqueries:       counter("jobwatch.listener.queries", "{query}", "Queries the Listener sent: health checks, delivery probes, notify gate checks."),
		probes:         counter("jobwatch.delivery.probes", "{probe}", "Delivery check probes sent through the watches' pools."),
		probesLost:     counter("jobwatch.delivery.probes_lost", "{probe}", "Delivery check probes that did not reach the Listener."),
		roundTrip:      gauge("jobwatch.delivery.round_trip", "s", "The last delivery probe's time from its NOTIFY through the pool to the Listener."),
		queueUsage:     gauge("jobwatch.notify_queue.usage", "1", "The server's notification queue in use, 0 to 1, at the last probe."),
		notifications:  counter("jobwatch.notifications", "{notification}", "Notifications on the table's channel."),
		working:        gauge("jobwatch.notifications.working", "1", "1 while the watch relies on notifications; 0 while it polls at its fallback interval because they fail it."),
		wakeups:        counter("jobwatch.wakeups", "{wakeup}", "JobAvailable messages sent, by what called for them."),
		dropped:        counter("jobwatch.wakeups.dropped", "{wakeup}", "JobAvailable messages dropped because the wake channel was full."),
		polls:          counter("jobwatch.polls", "{poll}", "Polls of the table."),
		pollErrors:     counter("jobwatch.poll.errors", "{poll}", "Polls that failed."),
		pollTime:       counter("jobwatch.poll.time", "s", "Time spent in poll queries."),
		pollInterval:   gauge("jobwatch.poll.interval", "s", "The poll interval in force: the fallback while notifications do not arrive."),
		queries:        counter("jobwatch.queries", "{query}", "Queries the watch sent: polls, trigger checks, installs."),
		repairs:        counter("jobwatch.trigger.repairs", "{repair}", "Times missing or disabled notification triggers were repaired."),
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		m.observe(o, in)
		return nil
	}, in.all()...)
	if err != nil {
		return nil, err
	}
	m.reg = reg
	return m, nil
}

type instruments struct {
	connected, roundTrip, queueUsage, working, pollInterval                        metric.Float64ObservableGauge
	connects, lnotifications, lqueries, probes, probesLost                         metric.Float64ObservableCounter
	notifications, wakeups, dropped, polls, pollErrors, pollTime, queries, repairs metric.Float64ObservableCounter
}

func (in instruments) all() []metric.Observable {
	return []metric.Observable{in.connected, in.roundTrip, in.queueUsage, in.working, in.pollInterval,
		in.connects, in.lnotifications, in.lqueries, in.probes, in.probesLost,
		in.notifications, in.wakeups, in.dropped, in.polls, in.pollErrors, in.pollTime, in.queries, in.repairs}
}

// Add makes the instruments report w, with its table as jobwatch.table.
func (m *Metrics) Add(w *jobwatch.Watch) {
	m.mu.Lock()
	m.watches[w] = true
	m.mu.Unlock()
}

// Remove stops reporting w.
func (m *Metrics) Remove(w *jobwatch.Watch) {
	m.mu.Lock()
	delete(m.watches, w)
	m.mu.Unlock()
}

// Close unregisters the instruments' callback.
func (m *Metrics) Close() error { return m.reg.Unregister() }

func (m *Metrics) observe(o metric.Observer, in instruments) {
	if m.listener != nil {
		s := m.listener.Stats()
		o.ObserveFloat64(in.connected, boolValue(s.Connected))
		o.ObserveFloat64(in.connects, float64(s.Connects))
		o.ObserveFloat64(in.lnotifications, float64(s.Notifications))
		o.ObserveFloat64(in.lqueries, float64(s.Queries))
		o.ObserveFloat64(in.probes, float64(s.DeliveryProbes))
		o.ObserveFloat64(in.probesLost, float64(s.DeliveryProbesLost))
		o.ObserveFloat64(in.roundTrip, s.DeliveryRoundTrip.Seconds())
		o.ObserveFloat64(in.queueUsage, s.NotifyQueueUsage)
	}
	m.mu.Lock()
	ws := make([]*jobwatch.Watch, 0, len(m.watches))
	for w := range m.watches {
		ws = append(ws, w)
	}
	m.mu.Unlock()
	for _, w := range ws {
		s := w.Stats()
		table := metric.WithAttributes(attribute.String("jobwatch.table", w.Table()))
		o.ObserveFloat64(in.notifications, float64(s.Notifications), table)
		o.ObserveFloat64(in.working, boolValue(s.NotificationsWorking), table)
		for cause, n := range map[string]uint64{"notification": s.Wakeups.Notification, "poll": s.Wakeups.Poll,
			"scheduled": s.Wakeups.Scheduled, "gate": s.Wakeups.Gate, "reconnect": s.Wakeups.Reconnect, "rescue": s.Wakeups.Rescue} {
			o.ObserveFloat64(in.wakeups, float64(n), metric.WithAttributes(
				attribute.String("jobwatch.table", w.Table()), attribute.String("jobwatch.cause", cause)))
		}
		o.ObserveFloat64(in.dropped, float64(s.WakeupsDropped), table)
		o.ObserveFloat64(in.polls, float64(s.Polls), table)
		o.ObserveFloat64(in.pollErrors, float64(s.PollErrors), table)
		o.ObserveFloat64(in.pollTime, s.PollTime.Seconds(), table)
		o.ObserveFloat64(in.pollInterval, s.PollInterval.Seconds(), table)
		o.ObserveFloat64(in.queries, float64(s.Queries), table)
		o.ObserveFloat64(in.repairs, float64(s.TriggerRepairs), table)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
