package broker

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// adminServer serves the broker's admin HTTP endpoints.
type adminServer struct {
	b   *Broker
	ln  net.Listener
	srv *http.Server
}

func newAdminServer(b *Broker, ln net.Listener) *adminServer {
	a := &adminServer{b: b, ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", a.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(b.reg, promhttp.HandlerOpts{Registry: b.reg}))
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, b.Stats())
	})
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return a
}

func (a *adminServer) serve() {
	if err := a.srv.Serve(a.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		a.b.log.Error("admin server stopped", "error", err)
	}
}

func (a *adminServer) shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }

// readyz is 200 only while the listeners serve and every dependency (the
// store) answers; it turns 503 the moment shutdown starts.
func (a *adminServer) readyz(w http.ResponseWriter, r *http.Request) {
	if !a.b.Ready() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": "listeners not serving"})
		return
	}
	if check := a.b.opts.Ready; check != nil {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := check(ctx); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": err.Error()})
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// collector exports Stats at scrape time, so metrics cost nothing on the
// publish path: mochi already counts everything in atomics.
type collector struct{ b *Broker }

var (
	descConnections = prometheus.NewDesc("rtm_broker_connections", "Connected MQTT clients.", nil, nil)
	descCapacity    = prometheus.NewDesc("rtm_broker_capacity", "Maximum concurrent connections of this node (broker.capacity).", nil, nil)
	descRejected    = prometheus.NewDesc("rtm_broker_connections_rejected_total", "CONNECTs refused, by reason.", []string{"reason"}, nil)
	descSessions    = prometheus.NewDesc("rtm_broker_sessions", "Sessions held, connected or not.", nil, nil)
	descSubs        = prometheus.NewDesc("rtm_broker_subscriptions", "Subscriptions of all sessions.", nil, nil)
	descRetained    = prometheus.NewDesc("rtm_broker_retained_messages", "Retained messages held.", nil, nil)
	descInflight    = prometheus.NewDesc("rtm_broker_inflight_messages", "QoS 1/2 messages awaiting acknowledgement or held for offline sessions.", nil, nil)
	descMsgIn       = prometheus.NewDesc("rtm_broker_messages_received_total", "PUBLISH packets received from clients.", nil, nil)
	descMsgOut      = prometheus.NewDesc("rtm_broker_messages_sent_total", "PUBLISH packets sent to clients.", nil, nil)
	descDropped     = prometheus.NewDesc("rtm_broker_messages_dropped_total", "Messages not delivered to a client because its write queue (queue_full) or its session (session_full) already held broker.max_queued messages, or it had no free packet identifier (packet_ids), by reason and published QoS.", []string{"reason", "qos"}, nil)
	descBytesIn     = prometheus.NewDesc("rtm_broker_received_bytes_total", "Bytes received from clients.", nil, nil)
	descBytesOut    = prometheus.NewDesc("rtm_broker_sent_bytes_total", "Bytes sent to clients.", nil, nil)
	descPktIn       = prometheus.NewDesc("rtm_broker_packets_received_total", "MQTT packets received.", nil, nil)
	descPktOut      = prometheus.NewDesc("rtm_broker_packets_sent_total", "MQTT packets sent.", nil, nil)
	descUp          = prometheus.NewDesc("rtm_broker_ready", "1 while the broker accepts clients.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnections, descCapacity, descRejected, descSessions, descSubs, descRetained,
		descInflight, descMsgIn, descMsgOut, descDropped, descBytesIn, descBytesOut, descPktIn, descPktOut, descUp} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.b.Stats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(descConnections, float64(s.Connections))
	gauge(descCapacity, float64(s.Capacity))
	counter(descRejected, s.RejectedCapacity, "capacity")
	gauge(descSessions, float64(s.Sessions))
	gauge(descSubs, float64(s.Subscriptions))
	gauge(descRetained, float64(s.Retained))
	gauge(descInflight, float64(s.Inflight))
	counter(descMsgIn, s.MessagesReceived)
	counter(descMsgOut, s.MessagesSent)
	for reason, byQoS := range s.DroppedByReason {
		for q, n := range byQoS {
			counter(descDropped, n, reason, q)
		}
	}
	counter(descBytesIn, s.BytesReceived)
	counter(descBytesOut, s.BytesSent)
	counter(descPktIn, s.PacketsReceived)
	counter(descPktOut, s.PacketsSent)
	ready := 0.0
	if s.Ready {
		ready = 1
	}
	gauge(descUp, ready)
}

var _ prometheus.Collector = (*collector)(nil)
