// Package jobwatchprom exports jobwatch's Stats to Prometheus: a
// prometheus.Collector that reads a Listener's and its watches' counters
// at each scrape. It is a module of its own, so that jobwatch does not
// depend on the Prometheus client.
//
//	c := jobwatchprom.NewCollector(listener)
//	c.Add(watch)
//	prometheus.MustRegister(c)
//
// Metrics (namespace jobwatch; the watches' carry a "table" label):
//
//	listener_connected                 1 while the Listener's connection is up
//	listener_connects_total            successful connects, the first included
//	listener_notifications_total       notifications received for subscribed channels
//	listener_queries_total             queries the Listener sent (health, delivery and gate checks)
//	delivery_probes_total              the delivery check's probes, and
//	delivery_probes_lost_total           those that did not arrive
//	delivery_round_trip_seconds        the last probe's NOTIFY-to-Listener time
//	notify_queue_usage_ratio           the server's notification queue in use, 0 to 1
//	notifications_total                notifications on the table's channel
//	notifications_working              1 while the watch relies on notifications (0: it polls at its fallback interval)
//	wakeups_total{cause}               JobAvailable sent: notification, poll, scheduled, gate, reconnect, rescue
//	wakeups_dropped_total              JobAvailable dropped, the channel full
//	polls_total, poll_errors_total     polls run, and those that failed
//	poll_seconds_total                 time in poll queries
//	poll_interval_seconds              the interval in force (the fallback while degraded)
//	queries_total                      queries the watch sent (polls, trigger checks, installs)
//	trigger_repairs_total              times missing or disabled triggers were repaired
package jobwatchprom

import (
	"sync"

	"github.com/jobwatch-go/jobwatch"
	"github.com/prometheus/client_golang/prometheus"
)

// Collector is a prometheus.Collector over one Listener and the watches
// added to it. It is safe for concurrent use.
type Collector struct {
	listener *jobwatch.Listener

	mu      sync.Mutex
	watches map[*jobwatch.Watch]bool
}

// NewCollector returns a Collector for listener (nil: watches only).
func NewCollector(listener *jobwatch.Listener) *Collector {
	return &Collector{listener: listener, watches: map[*jobwatch.Watch]bool{}}
}

// Add makes the collector report w, labelled with its table. A watch
// that is closed keeps its last values until Remove.
func (c *Collector) Add(w *jobwatch.Watch) {
	c.mu.Lock()
	c.watches[w] = true
	c.mu.Unlock()
}

// Remove stops reporting w.
func (c *Collector) Remove(w *jobwatch.Watch) {
	c.mu.Lock()
	delete(c.watches, w)
	c.mu.Unlock()
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName("jobwatch", "", name), help, labels, nil)
}

var (
	listenerConnected     = desc("listener_connected", "1 while the Listener's connection is up and listening.")
	listenerConnects      = desc("listener_connects_total", "Successful connects of the Listener, the first included.")
	listenerNotifications = desc("listener_notifications_total", "Notifications the Listener received for subscribed channels.")
	listenerQueries       = desc("listener_queries_total", "Queries the Listener sent: health checks, delivery probes, notify gate checks.")
	deliveryProbes        = desc("delivery_probes_total", "Delivery check probes sent through the watches' pools.")
	deliveryProbesLost    = desc("delivery_probes_lost_total", "Delivery check probes that did not reach the Listener.")
	deliveryRoundTrip     = desc("delivery_round_trip_seconds", "The last delivery probe's time from its NOTIFY through the pool to the Listener.")
	notifyQueueUsage      = desc("notify_queue_usage_ratio", "The server's notification queue in use, 0 to 1, at the last probe.")

	notifications        = desc("notifications_total", "Notifications on the table's channel.", "table")
	notificationsWorking = desc("notifications_working", "1 while the watch relies on notifications; 0 while it polls at its fallback interval because they fail it.", "table")
	wakeups              = desc("wakeups_total", "JobAvailable messages sent, by what called for them.", "table", "cause")
	wakeupsDropped       = desc("wakeups_dropped_total", "JobAvailable messages dropped because the wake channel was full.", "table")
	polls                = desc("polls_total", "Polls of the table.", "table")
	pollErrors           = desc("poll_errors_total", "Polls that failed.", "table")
	pollSeconds          = desc("poll_seconds_total", "Time spent in poll queries.", "table")
	pollInterval         = desc("poll_interval_seconds", "The poll interval in force: the fallback while notifications do not arrive.", "table")
	queries              = desc("queries_total", "Queries the watch sent: polls, trigger checks, installs.", "table")
	triggerRepairs       = desc("trigger_repairs_total", "Times missing or disabled notification triggers were repaired.", "table")
)

// Describe sends the descriptors of every metric the collector reports.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{listenerConnected, listenerConnects, listenerNotifications, listenerQueries,
		deliveryProbes, deliveryProbesLost, deliveryRoundTrip, notifyQueueUsage,
		notifications, notificationsWorking, wakeups, wakeupsDropped, polls, pollErrors, pollSeconds, pollInterval, queries, triggerRepairs} {
		ch <- d
	}
}

// Collect reads the Stats of the Listener and every watch.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	if c.listener != nil {
		s := c.listener.Stats()
		gauge(listenerConnected, boolValue(s.Connected))
		counter(listenerConnects, float64(s.Connects))
		counter(listenerNotifications, float64(s.Notifications))
		counter(listenerQueries, float64(s.Queries))
		counter(deliveryProbes, float64(s.DeliveryProbes))
		counter(deliveryProbesLost, float64(s.DeliveryProbesLost))
		gauge(deliveryRoundTrip, s.DeliveryRoundTrip.Seconds())
		gauge(notifyQueueUsage, s.NotifyQueueUsage)
	}
	c.mu.Lock()
	ws := make([]*jobwatch.Watch, 0, len(c.watches))
	for w := range c.watches {
		ws = append(ws, w)
	}
	c.mu.Unlock()
	for _, w := range ws {
		t, s := w.Table(), w.Stats()
		counter(notifications, float64(s.Notifications), t)
		gauge(notificationsWorking, boolValue(s.NotificationsWorking), t)
		for cause, n := range map[string]uint64{"notification": s.Wakeups.Notification, "poll": s.Wakeups.Poll,
			"scheduled": s.Wakeups.Scheduled, "gate": s.Wakeups.Gate, "reconnect": s.Wakeups.Reconnect, "rescue": s.Wakeups.Rescue} {
			counter(wakeups, float64(n), t, cause)
		}
		counter(wakeupsDropped, float64(s.WakeupsDropped), t)
		counter(polls, float64(s.Polls), t)
		counter(pollErrors, float64(s.PollErrors), t)
		counter(pollSeconds, s.PollTime.Seconds(), t)
		gauge(pollInterval, s.PollInterval.Seconds(), t)
		counter(queries, float64(s.Queries), t)
		counter(triggerRepairs, float64(s.TriggerRepairs), t)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
