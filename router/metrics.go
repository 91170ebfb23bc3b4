package router

import (
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// metrics are the router's series, registered on the injected registry by
// Start.
type metrics struct {
	all         []prometheus.Collector
	requests    *prometheus.CounterVec
	decisions   *prometheus.CounterVec
	unavailable *prometheus.CounterVec
	latency     prometheus.Histogram
}

func newMetrics(v *view) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_router_requests_total",
			Help: "Route requests (GET /v1/route) answered, by HTTP status code.",
		}, []string{"code"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_router_decisions_total",
			Help: "Route answers naming each broker.",
		}, []string{"node"}),
		unavailable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_router_unavailable_total",
			Help: "Route requests answered 503 no_broker: no eligible broker offered the transport.",
		}, []string{"transport"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "rtm_router_request_duration_seconds",
			Help: "Time to answer a route request, from the handler's start to the written answer.",
			// 25µs to about 100ms.
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 13),
		}),
	}
	for _, c := range []int{http.StatusOK, http.StatusBadRequest, http.StatusServiceUnavailable} {
		m.requests.WithLabelValues(strconv.Itoa(c))
	}
	for _, t := range cluster.Transports {
		m.unavailable.WithLabelValues(t)
	}
	m.all = []prometheus.Collector{m.requests, m.decisions, m.unavailable, m.latency, &brokersCollector{v: v}}
	// A broker that gossip has forgotten takes its series with it, so a
	// cluster whose node names change (containers) does not grow them
	// without bound.
	v.forget = func(name string) { m.decisions.DeleteLabelValues(name) }
	return m
}

// register adds the series to reg.
func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range m.all {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// brokersCollector exports the view's brokers by status at scrape time.
type brokersCollector struct{ v *view }

var descBrokers = prometheus.NewDesc("rtm_router_brokers",
	"Brokers in the router's view, by status: alive (taking devices), draining (alive but taking none), leaving, left, failed.",
	[]string{"status"}, nil)

func (c *brokersCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descBrokers }

func (c *brokersCollector) Collect(ch chan<- prometheus.Metric) {
	counts := map[string]int{"alive": 0, "draining": 0, "leaving": 0, "left": 0, "failed": 0}
	for _, n := range c.v.nodes() {
		s := n.Status
		if s == string(cluster.StatusAlive) && n.Draining {
			s = "draining"
		}
		counts[s]++
	}
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(descBrokers, prometheus.GaugeValue, float64(n), s)
	}
}

var _ prometheus.Collector = (*brokersCollector)(nil)
