package watchdog

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the watchdog's series, registered by Start.
type metrics struct {
	polls         *prometheus.CounterVec
	pollDuration  prometheus.Histogram
	notifications *prometheus.CounterVec
	actions       *prometheus.CounterVec
	all           []prometheus.Collector
}

func newMetrics(w *Watchdog) *metrics {
	m := &metrics{
		polls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_watchdog_polls_total", Help: "Polls of brokers' /v1/stats, by result (ok, error).",
		}, []string{"result"}),
		pollDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "rtm_watchdog_poll_duration_seconds", Help: "Time to poll one broker's /v1/stats.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		notifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_watchdog_notifications_total", Help: "Alert notifications by sink and result (ok, retry, failed, dropped).",
		}, []string{"sink", "result"}),
		actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_watchdog_actions_total", Help: "Actions of alerts (drain, undrain) by result (ok, failed, refused by a guard rail).",
		}, []string{"action", "result"}),
	}
	for _, r := range []string{"ok", "error"} {
		m.polls.WithLabelValues(r)
	}
	m.all = []prometheus.Collector{m.polls, m.pollDuration, m.notifications, m.actions, &stateCollector{w}}
	return m
}

func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range m.all {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

var (
	descNodes  = prometheus.NewDesc("rtm_watchdog_brokers", "Brokers the watchdog watches, by state (alive, suspect, failed, left).", []string{"state"}, nil)
	descAlerts = prometheus.NewDesc("rtm_watchdog_alerts", "Alerts in progress, by state (pending, firing) and severity.", []string{"state", "severity"}, nil)
)

// stateCollector exports the watchdog's view at scrape time.
type stateCollector struct{ w *Watchdog }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descNodes; ch <- descAlerts }

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	c.w.mu.Lock()
	nodes := map[string]float64{"alive": 0, "suspect": 0, "failed": 0, "left": 0}
	for _, n := range c.w.nodes {
		nodes[n.status]++
	}
	type sk struct{ state, sev string }
	alerts := map[sk]float64{}
	for _, st := range []string{StatePending, StateFiring} {
		for _, sev := range []string{"critical", "warning", "info"} {
			alerts[sk{st, sev}] = 0
		}
	}
	for _, a := range c.w.active {
		alerts[sk{a.State, a.Severity}]++
	}
	c.w.mu.Unlock()
	for s, v := range nodes {
		ch <- prometheus.MustNewConstMetric(descNodes, prometheus.GaugeValue, v, s)
	}
	for k, v := range alerts {
		ch <- prometheus.MustNewConstMetric(descAlerts, prometheus.GaugeValue, v, k.state, k.sev)
	}
}
