package router

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// Error codes of the router's API, in the "error" field of an error answer.
const (
	CodeBadRequest       = "bad_request"
	CodeBadTransport     = "bad_transport"
	CodeBadClientID      = "bad_client_id"
	CodeNoBroker         = "no_broker"
	CodeNotFound         = "not_found"
	CodeMethodNotAllowed = "method_not_allowed"
)

// maxClientID is the longest MQTT client identifier, in bytes.
const maxClientID = 65535

// Route is the answer to GET /v1/route: the broker a device should connect
// to.
type Route struct {
	Node      string `json:"node"`
	Host      string `json:"host"`
	Port      int    `json:"port"`
	URL       string `json:"url"`
	Transport string `json:"transport"`
}

// Nodes is the answer to GET /v1/nodes.
type Nodes struct {
	Router  string `json:"router"`
	Brokers []Node `json:"brokers"`
}

// Error is the body of every error answer.
type Error struct {
	Code    string `json:"error"`
	Message string `json:"message"`
}

// paths lists the router's endpoints, for 404 versus 405.
var paths = []string{"/v1/route", "/v1/nodes", "/healthz", "/readyz", "/metrics"}

func (r *Router) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/route", r.handleRoute)
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, Nodes{Router: r.cfg.Name, Brokers: r.Nodes()})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !r.ready.Load() {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": "shutting down"})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{Registry: r.reg}))
	// Everything else gets a JSON error too, not ServeMux's plain text.
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		if slices.Contains(paths, req.URL.Path) {
			w.Header().Set("Allow", "GET, HEAD")
			writeError(w, http.StatusMethodNotAllowed, CodeMethodNotAllowed, req.Method+" is not allowed on "+req.URL.Path+": use GET")
			return
		}
		writeError(w, http.StatusNotFound, CodeNotFound, "no such endpoint: "+req.URL.Path)
	})
	return mux
}

// handleRoute answers GET /v1/route?client_id=ID&transport=tcp|ws|tls|wss.
func (r *Router) handleRoute(w http.ResponseWriter, req *http.Request) {
	start := time.Now()
	code := r.route(w, req)
	r.m.requests.WithLabelValues(strconv.Itoa(code)).Inc()
	r.m.latency.Observe(time.Since(start).Seconds())
}

func (r *Router) route(w http.ResponseWriter, req *http.Request) int {
	q, err := url.ParseQuery(req.URL.RawQuery)
	if err != nil {
		return writeError(w, http.StatusBadRequest, CodeBadRequest, "malformed query string: "+err.Error())
	}
	transport := q.Get("transport")
	if transport == "" {
		transport = cluster.TransportTCP
	}
	if !slices.Contains(cluster.Transports, transport) {
		return writeError(w, http.StatusBadRequest, CodeBadTransport,
			fmt.Sprintf("unknown transport %q: want one of %s", transport, strings.Join(cluster.Transports, ", ")))
	}
	if q.Has("client_id") {
		if msg := checkClientID(q.Get("client_id")); msg != "" {
			return writeError(w, http.StatusBadRequest, CodeBadClientID, msg)
		}
	}
	m, ok := r.view.pick(transport)
	if !ok {
		r.m.unavailable.WithLabelValues(transport).Inc()
		w.Header().Set("Retry-After", "1")
		return writeError(w, http.StatusServiceUnavailable, CodeNoBroker,
			fmt.Sprintf("no broker can take a device over %s now: none is alive, not draining, offering %s and below capacity", transport, transport))
	}
	r.m.decisions.WithLabelValues(m.Name).Inc()
	addr := m.Tags.Endpoint(transport)
	host, port := cluster.SplitEndpoint(addr)
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, Route{Node: m.Name, Host: host, Port: port, URL: cluster.URL(transport, addr), Transport: transport})
	return http.StatusOK
}

// checkClientID returns why id is not a client identifier a broker accepts,
// or "".
func checkClientID(id string) string {
	switch {
	case id == "" || len(id) > maxClientID:
		return fmt.Sprintf("client_id must be 1 to %d bytes, got %d", maxClientID, len(id))
	case !utf8.ValidString(id):
		return "client_id must be valid UTF-8"
	case strings.IndexByte(id, 0) >= 0:
		return "client_id must not contain NUL (U+0000)"
	case strings.ContainsAny(id, "/+#") || id[0] == '$':
		// Brokers refuse it (CONNACK 0x85): it is a topic level of the
		// device's inbox (token.CheckClientID).
		return "client_id must be one topic level: no '/', '+' or '#', and not starting with '$'"
	}
	return ""
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) int {
	writeJSON(w, status, Error{Code: code, Message: msg})
	return status
}
