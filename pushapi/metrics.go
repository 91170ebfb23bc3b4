package pushapi

import (
	"strconv"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the push API's series, registered on the injected registry.
type metrics struct {
	requests        *prometheus.CounterVec
	duration        *prometheus.HistogramVec
	publishes       *prometheus.CounterVec
	publishLatency  *prometheus.HistogramVec
	brokerUp        prometheus.Gauge
	connects        prometheus.Counter
	connectFailures prometheus.Counter
	storeTimeouts   prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_pushapi_requests_total",
			Help: "HTTP requests answered, by route (the path template, or \"unmatched\"), method and status code.",
		}, []string{"route", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "rtm_pushapi_request_duration_seconds",
			Help: "Time to answer an HTTP request, by route.",
			// 100µs to about 13s.
			Buckets: prometheus.ExponentialBuckets(100e-6, 2.5, 14),
		}, []string{"route"}),
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rtm_pushapi_publishes_total",
			Help: "Messages published, by result: ok (acknowledged, or written at QoS 0), rejected (the broker refused it), unavailable (no connection, or lost before the acknowledgement), timeout (no acknowledgement within pushapi.publish_timeout).",
		}, []string{"result"}),
		publishLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "rtm_pushapi_publish_duration_seconds",
			Help: "Time from writing a message to the broker to its acknowledgement (QoS 1 PUBACK, QoS 2 PUBCOMP; QoS 0: the write), by QoS.",
			// 25µs to about 3.3s.
			Buckets: prometheus.ExponentialBuckets(25e-6, 2.2, 16),
		}, []string{"qos"}),
		brokerUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rtm_pushapi_broker_connected",
			Help: "1 while the push API's MQTT connection to a broker is up.",
		}),
		connects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rtm_pushapi_broker_connects_total",
			Help: "MQTT connections to a broker established (the first one, then one per failover or reconnect).",
		}),
		connectFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rtm_pushapi_broker_connect_failures_total",
			Help: "MQTT connection attempts to a broker that failed.",
		}),
		storeTimeouts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rtm_pushapi_store_timeouts_total",
			Help: "Requests answered 503 store_timeout: no store slot free, or no answer from the store, within the store timeout.",
		}),
	}
	for _, r := range []string{"ok", "rejected", "unavailable", "timeout"} {
		m.publishes.WithLabelValues(r)
	}
	return m
}

// register adds the series to reg (at Start: New registers nothing).
func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.publishes, m.publishLatency, m.brokerUp,
		m.connects, m.connectFailures, m.storeTimeouts} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// observe is the middleware that counts requests. It runs outside the
// error handler's rendering, so it reads the status the error will get.
func (m *metrics) observe(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		start := time.Now()
		err := next(c)
		route := c.Path()
		if he, ok := err.(*echo.HTTPError); route == "" || ok && (he.Code == 404 || he.Code == 405) {
			route = "unmatched" // Echo's own 404 and 405: no route, unbounded paths
		}
		code := c.Response().Status
		if err != nil {
			code = errorStatus(err)
		}
		m.requests.WithLabelValues(route, c.Request().Method, strconv.Itoa(code)).Inc()
		m.duration.WithLabelValues(route).Observe(time.Since(start).Seconds())
		return err
	}
}

// errorStatus is the status the error handler answers err with.
func errorStatus(err error) int {
	switch e := err.(type) {
	case *Error:
		return e.Status
	case *echo.HTTPError:
		return e.Code
	}
	return 500
}
