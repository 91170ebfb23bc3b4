package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rtm-dev/rtm/internal/lifecycle"
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
	mux.HandleFunc("GET /v1/cluster", func(w http.ResponseWriter, _ *http.Request) {
		if b.cluster == nil {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "not_clustered", "message": "this broker runs alone (cluster.gossip_addr is empty)"})
			return
		}
		writeJSON(w, http.StatusOK, b.cluster.stats())
	})
	// Drain and undrain (rtm node drain/undrain).
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		evacuate := false
		if v := r.URL.Query().Get("evacuate"); v != "" {
			var err error
			if evacuate, err = strconv.ParseBool(v); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request", "message": "evacuate: want true or false"})
				return
			}
		}
		writeJSON(w, http.StatusOK, b.Drain(evacuate))
	})
	mux.HandleFunc("POST /v1/undrain", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, b.Undrain())
	})
	// Server-side subscriptions and kicks (the push API). A client here
	// may be connected or an offline session.
	mux.HandleFunc("POST /v1/clients/{id}/subscriptions", a.subscribe)
	mux.HandleFunc("DELETE /v1/clients/{id}/subscriptions", a.unsubscribe)
	mux.HandleFunc("POST /v1/clients/{id}/disconnect", a.disconnect)
	// Group membership changes (the push API), see groupChange.
	mux.HandleFunc("POST /v1/groups/changes", a.groupChange)
	mux.HandleFunc("POST /v1/sys/alerts", a.postSysAlert)
	mux.HandleFunc("GET /v1/drain", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, b.drain.state())
	})
	// Go's profiler, behind the admin key like every path not declared
	// open: a CPU or allocation profile under load is how a cost is found
	// (make profile), and it discloses nothing about devices.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	a.srv = &http.Server{Handler: newAdminAuth(b.cfg.AdminKeyList(), mux), ReadHeaderTimeout: 5 * time.Second}
	return a
}

func (a *adminServer) serve() {
	lifecycle.Serve(a.srv, a.ln, &a.b.fault, "broker: admin server")
}

// adminShutdownGrace bounds how long Shutdown lets admin requests in
// progress finish. net/http also waits up to 5 s for connections that were
// opened but sent no request yet (HTTP clients, load balancers and scrapers
// leave such connections), which would hold SIGTERM for nothing.
const adminShutdownGrace = 500 * time.Millisecond

func (a *adminServer) shutdown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, adminShutdownGrace)
	defer cancel()
	if err := a.srv.Shutdown(ctx); errors.Is(err, context.DeadlineExceeded) {
		return a.srv.Close()
	} else if err != nil {
		return err
	}
	return nil
}

// Readiness is the body of /readyz.
type Readiness struct {
	Status string `json:"status"`           // "ready" or "not ready"
	Reason string `json:"reason,omitempty"` // why not ready
	// Store is the store's state ("up", "down", or "none" without one).
	// It does not change the status: MQTT works without the store, and
	// device records are written when it answers again.
	Store      string `json:"store"`
	StoreError string `json:"store_error,omitempty"`
	Pending    int64  `json:"store_pending_writes,omitempty"`
}

// readyz is 200 while the broker can serve MQTT: its listeners serve and
// it is not shutting down (503 from the moment shutdown starts). The store
// is reported in the body, from the state the device record writer last
// saw, so a probe never waits for it.
func (a *adminServer) readyz(w http.ResponseWriter, r *http.Request) {
	res := Readiness{Status: "ready", Store: "none"}
	if a.b.devices != nil {
		s := a.b.devices.stats()
		res.Store, res.StoreError, res.Pending = "up", s.Error, s.Pending
		if !s.Up {
			res.Store = "down"
		}
	}
	if !a.b.Ready() {
		res.Status, res.Reason = "not ready", "listeners not serving"
		writeJSON(w, http.StatusServiceUnavailable, res)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (a *adminServer) client(w http.ResponseWriter, r *http.Request) (*mqtt.Client, bool) {
	id := r.PathValue("id")
	cl, ok := a.b.mq.Clients.Get(id)
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "unknown_client", "message": fmt.Sprintf("no session for client %q on node %s", id, a.b.cfg.NodeName)})
	}
	return cl, ok
}

func (a *adminServer) subscribe(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Filter string `json:"filter"`
		QoS    byte   `json:"qos"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil || body.QoS > 2 || !mqtt.IsValidFilter(body.Filter, false) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request", "message": `want {"filter": a valid topic filter, "qos": 0, 1 or 2}`})
		return
	}
	cl, ok := a.client(w, r)
	if !ok {
		return
	}
	existed := a.b.mq.SubscribeClient(cl, packets.Subscription{Filter: body.Filter, Qos: body.QoS})
	writeJSON(w, http.StatusOK, map[string]any{"client_id": cl.ID, "filter": body.Filter, "subscribed": true, "existed": existed, "node": a.b.cfg.NodeName})
}

func (a *adminServer) unsubscribe(w http.ResponseWriter, r *http.Request) {
	filter := r.URL.Query().Get("filter")
	cl, ok := a.client(w, r)
	if !ok {
		return
	}
	if !a.b.mq.UnsubscribeClientFilter(cl, filter) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "unknown_subscription", "message": fmt.Sprintf("client %q is not subscribed to %q", cl.ID, filter)})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"client_id": cl.ID, "filter": filter, "subscribed": false})
}

// disconnect kicks a connected client: MQTT 5 clients get DISCONNECT 0x98
// (administrative action). Its session stays, as after any disconnect.
func (a *adminServer) disconnect(w http.ResponseWriter, r *http.Request) {
	cl, ok := a.client(w, r)
	if !ok {
		return
	}
	if cl.Closed() || cl.Net.Conn == nil {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "not_connected", "message": fmt.Sprintf("client %q is not connected to node %s", cl.ID, a.b.cfg.NodeName)})
		return
	}
	a.b.redirect(cl, packets.ErrAdministrativeAction, "")
	writeJSON(w, http.StatusOK, map[string]any{"client_id": cl.ID, "disconnected": true, "node": a.b.cfg.NodeName})
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
	descParked      = prometheus.NewDesc("rtm_broker_connections_parked", "Idle MQTT connections over plain TCP parked: no goroutine of their own, a shared poller waits for their sockets (after 5 s idle).", nil, nil)
	descCapacity    = prometheus.NewDesc("rtm_broker_capacity", "Maximum concurrent connections of this node (broker.capacity).", nil, nil)
	descRejected    = prometheus.NewDesc("rtm_broker_connections_rejected_total", "CONNECTs refused, by reason.", []string{"reason"}, nil)
	descSessions    = prometheus.NewDesc("rtm_broker_sessions", "Sessions held, connected or not.", nil, nil)
	descSubs        = prometheus.NewDesc("rtm_broker_subscriptions", "Subscriptions of all sessions.", nil, nil)
	descRetained    = prometheus.NewDesc("rtm_broker_retained_messages", "Retained messages held.", nil, nil)
	descInflight    = prometheus.NewDesc("rtm_broker_inflight_messages", "QoS 1/2 messages held in sessions: sent to a client and not yet acknowledged, or held for an offline session; also messages received at QoS 2 until their PUBREL, and at QoS 1 until their PUBACK has been written.", nil, nil)
	descMsgIn       = prometheus.NewDesc("rtm_broker_messages_received_total", "PUBLISH packets received from clients.", nil, nil)
	descMsgOut      = prometheus.NewDesc("rtm_broker_messages_sent_total", "PUBLISH packets sent to clients.", nil, nil)
	descDropped     = prometheus.NewDesc("rtm_broker_messages_dropped_total", "Messages lost, by reason and QoS: for a client, its write queue (queue_full) or session (session_full) held broker.max_queued messages, no free packet identifier (packet_ids), bigger than its MQTT 5 Maximum Packet Size (too_large), QoS 0 while it is not connected (offline), expired while held (expired), held by a session that expired (session_expired), the client held broker.max_queued_bytes (queue_bytes), the node's clients held broker.max_queued_bytes_total (memory_budget); for a peer node, its link queue held cluster.link_queue_bytes (link_queue_full), too large for a link frame (link_oversize), no link to a peer with matching routes (no_link), discarded when its link closed (link_closed: the peer left, stayed failed past cluster.failed_peer_hold, or shutdown), QoS 0 lost when a link connection broke (link_reset), queued for a process that restarted (peer_restarted). A QoS 1/2 publish refused at a link is counted once per peer. See docs/broker.md.", []string{"reason", "qos"}, nil)
	descBytesIn     = prometheus.NewDesc("rtm_broker_received_bytes_total", "Bytes received from clients.", nil, nil)
	descBytesOut    = prometheus.NewDesc("rtm_broker_sent_bytes_total", "Bytes sent to clients.", nil, nil)
	descPktIn       = prometheus.NewDesc("rtm_broker_packets_received_total", "MQTT packets received.", nil, nil)
	descPktOut      = prometheus.NewDesc("rtm_broker_packets_sent_total", "MQTT packets sent.", nil, nil)
	descUp          = prometheus.NewDesc("rtm_broker_ready", "1 while the broker accepts clients.", nil, nil)

	descQueuedB   = prometheus.NewDesc("rtm_broker_queued_bytes", "Bytes of messages (payload and topic) held for clients: write queues and sessions (bounded by broker.max_queued_bytes_total).", nil, nil)
	descReadingB  = prometheus.NewDesc("rtm_broker_reading_bytes", "Bytes of partly received packets over 4 KiB (bounded by broker.max_reading_bytes).", nil, nil)
	descReadClose = prometheus.NewDesc("rtm_broker_read_limit_closes_total", "Connections closed because a packet exceeded a read bound: broker.max_reading_bytes (read_budget) or broker.max_connect_size (connect_size).", []string{"reason"}, nil)

	descBPWaits   = prometheus.NewDesc("rtm_broker_backpressure_waits_total", "Waits of a publish (or a message from a peer) for a subscriber whose session or write queue was over half of broker.max_queued.", nil, nil)
	descBPSeconds = prometheus.NewDesc("rtm_broker_backpressure_wait_seconds_total", "Time publishes spent waiting for congested subscribers.", nil, nil)
	descBPStalls  = prometheus.NewDesc("rtm_broker_backpressure_stalls_total", "Subscribers marked stalled: still congested after broker.backpressure_max_wait; messages to them are no longer waited for until they drain.", nil, nil)
	descBPSkips   = prometheus.NewDesc("rtm_broker_backpressure_stalled_skips_total", "Messages to a stalled subscriber not waited for (queued while it had room, else dropped and counted in rtm_broker_messages_dropped_total).", nil, nil)
	descBPQuota   = prometheus.NewDesc("rtm_broker_backpressure_receive_quota_waits_total", "MQTT 3.1.1 publishers at broker.max_inflight unacknowledged messages not read until a held acknowledgement was released (MQTT 5 clients are disconnected 0x93 instead).", nil, nil)

	descMembers      = prometheus.NewDesc("rtm_cluster_members", "Gossip members this node knows, by status and role.", []string{"status", "role"}, nil)
	descLinkUp       = prometheus.NewDesc("rtm_cluster_link_up", "1 while the node link to the peer is connected and authenticated.", []string{"peer"}, nil)
	descLinkMsgs     = prometheus.NewDesc("rtm_cluster_link_sent_messages_total", "Messages written to the peer's link (first sends).", []string{"peer"}, nil)
	descLinkBytes    = prometheus.NewDesc("rtm_cluster_link_sent_bytes_total", "Message bytes written to the peer's link.", []string{"peer"}, nil)
	descLinkResends  = prometheus.NewDesc("rtm_cluster_link_resent_messages_total", "Reliable messages written again after the peer's link reconnected.", []string{"peer"}, nil)
	descLinkQueue    = prometheus.NewDesc("rtm_cluster_link_queue_messages", "Messages queued for the peer, not yet acknowledged.", []string{"peer"}, nil)
	descLinkQueueB   = prometheus.NewDesc("rtm_cluster_link_queue_bytes", "Bytes queued for the peer, not yet acknowledged.", []string{"peer"}, nil)
	descLinkDropped  = prometheus.NewDesc("rtm_cluster_link_dropped_messages_total", "Messages for the peer not queued because its queue held cluster.link_queue_bytes, by reliability (also counted in rtm_broker_messages_dropped_total{reason=\"link_queue_full\"}, with every other link loss).", []string{"peer", "reliable"}, nil)
	descLinkRecv     = prometheus.NewDesc("rtm_cluster_link_received_messages_total", "Messages received from the peer's link.", []string{"peer"}, nil)
	descLinkRecvB    = prometheus.NewDesc("rtm_cluster_link_received_bytes_total", "Message bytes received from the peer's link.", []string{"peer"}, nil)
	descLinkDup      = prometheus.NewDesc("rtm_cluster_link_duplicates_total", "Re-sent messages from the peer skipped as already delivered.", []string{"peer"}, nil)
	descLinkAuthFail = prometheus.NewDesc("rtm_cluster_link_auth_failures_total", "Inbound node links refused (bad secret, protocol or handshake).", nil, nil)
	descRoutesLocal  = prometheus.NewDesc("rtm_cluster_routes_local", "Topic filters (and share groups) this node's clients subscribe to, announced to peers.", nil, nil)
	descRoutesRemote = prometheus.NewDesc("rtm_cluster_routes_remote", "Routes held for the peer.", []string{"peer"}, nil)
	descForwarded    = prometheus.NewDesc("rtm_cluster_forwarded_messages_total", "Publishes forwarded to peers (one per peer).", nil, nil)
	descFromPeers    = prometheus.NewDesc("rtm_cluster_received_messages_total", "Publishes received from peers for local subscribers.", nil, nil)
	descClaimTimeout = prometheus.NewDesc("rtm_cluster_claim_timeouts_total", "CONNECTs that stopped waiting for other nodes to end a connection with the same client ID (cluster.claim_timeout).", nil, nil)
	descMoved        = prometheus.NewDesc("rtm_cluster_sessions_moved_total", "Sessions received from another node when their client connected here.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnections, descParked, descCapacity, descRejected, descSessions, descSubs, descRetained,
		descInflight, descMsgIn, descMsgOut, descDropped, descBytesIn, descBytesOut, descPktIn, descPktOut, descUp,
		descBPWaits, descBPSeconds, descBPStalls, descBPSkips, descBPQuota, descQueuedB, descReadingB, descReadClose,
		descMembers, descLinkUp, descLinkMsgs, descLinkBytes, descLinkResends, descLinkQueue, descLinkQueueB, descLinkDropped,
		descLinkRecv, descLinkRecvB, descLinkDup, descLinkAuthFail, descRoutesLocal, descRoutesRemote, descForwarded,
		descFromPeers, descClaimTimeout, descMoved} {
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
	gauge(descParked, float64(s.Parked))
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
	counter(descBPWaits, s.Backpressure.Waits)
	ch <- prometheus.MustNewConstMetric(descBPSeconds, prometheus.CounterValue, s.Backpressure.WaitSeconds)
	counter(descBPStalls, s.Backpressure.Stalls)
	counter(descBPSkips, s.Backpressure.StalledSkips)
	counter(descBPQuota, s.Backpressure.ReceiveQuotaWaits)
	gauge(descQueuedB, float64(s.Memory.QueuedBytes))
	gauge(descReadingB, float64(s.Memory.ReadingBytes))
	counter(descReadClose, s.Memory.ReadRefused, "read_budget")
	counter(descReadClose, s.Memory.ConnectTooLarge, "connect_size")
	counter(descBytesIn, s.BytesReceived)
	counter(descBytesOut, s.BytesSent)
	counter(descPktIn, s.PacketsReceived)
	counter(descPktOut, s.PacketsSent)
	ready := 0.0
	if s.Ready {
		ready = 1
	}
	gauge(descUp, ready)
	if cs := s.Cluster; cs != nil {
		members := map[[2]string]int{}
		for _, m := range cs.Members {
			members[[2]string{m.Status, m.Role}]++
		}
		for k, n := range members {
			gauge(descMembers, float64(n), k[0], k[1])
		}
		for _, l := range cs.Links {
			up := 0.0
			if l.State == "up" {
				up = 1
			}
			gauge(descLinkUp, up, l.Peer)
			counter(descLinkMsgs, l.Messages, l.Peer)
			counter(descLinkBytes, l.Bytes, l.Peer)
			counter(descLinkResends, l.Resends, l.Peer)
			gauge(descLinkQueue, float64(l.QueueLen), l.Peer)
			gauge(descLinkQueueB, float64(l.QueueBytes), l.Peer)
			counter(descLinkDropped, l.DroppedReliable, l.Peer, "true")
			counter(descLinkDropped, l.DroppedUnreliable, l.Peer, "false")
		}
		for peer, in := range cs.Inbound {
			counter(descLinkRecv, in.Messages, peer)
			counter(descLinkRecvB, in.Bytes, peer)
			counter(descLinkDup, in.Duplicates, peer)
		}
		counter(descLinkAuthFail, cs.AuthFailures)
		gauge(descRoutesLocal, float64(cs.LocalRoutes))
		for peer, n := range cs.RemoteRoutes {
			gauge(descRoutesRemote, float64(n), peer)
		}
		counter(descForwarded, cs.Forwarded)
		counter(descFromPeers, cs.Received)
		counter(descClaimTimeout, cs.ClaimTimeouts)
		counter(descMoved, cs.SessionsMoved)
	}
}

var _ prometheus.Collector = (*collector)(nil)
