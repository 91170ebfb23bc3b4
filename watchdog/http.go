package watchdog

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rtm-dev/rtm/watchdog/ui"
)

// pingEvery is the comment the event stream sends to keep proxies open.
const pingEvery = 15 * time.Second

func (w *Watchdog) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(rw http.ResponseWriter, _ *http.Request) {
		writeJSON(rw, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(rw http.ResponseWriter, _ *http.Request) {
		if !w.ready.Load() {
			writeJSON(rw, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": "not started or shutting down"})
			return
		}
		writeJSON(rw, http.StatusOK, map[string]string{"status": "ready"})
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(w.reg, promhttp.HandlerOpts{Registry: w.reg}))
	key := w.requireKey
	mux.Handle("GET /v1/nodes", key(func(rw http.ResponseWriter, _ *http.Request) {
		writeJSON(rw, http.StatusOK, map[string]any{"nodes": w.Nodes()})
	}))
	mux.Handle("GET /v1/alerts", key(func(rw http.ResponseWriter, r *http.Request) {
		state := r.URL.Query().Get("state")
		switch state {
		case "", StatePending, StateFiring, StateResolved:
		default:
			writeJSON(rw, http.StatusBadRequest, map[string]string{"error": "bad_request", "message": "state: want pending, firing or resolved"})
			return
		}
		writeJSON(rw, http.StatusOK, map[string]any{"alerts": w.Alerts(state)})
	}))
	mux.Handle("GET /v1/series", key(func(rw http.ResponseWriter, _ *http.Request) {
		w.mu.Lock()
		out := map[string]SeriesJSON{}
		for name, n := range w.nodes {
			out[name] = n.series.snapshot()
		}
		w.mu.Unlock()
		writeJSON(rw, http.StatusOK, map[string]any{"interval_seconds": w.cfg.Interval.Seconds(), "nodes": out})
	}))
	mux.Handle("GET /v1/events", key(w.events))
	mux.Handle("/v1/", key(func(rw http.ResponseWriter, _ *http.Request) {
		writeJSON(rw, http.StatusNotFound, map[string]string{"error": "not_found", "message": "no such endpoint"})
	}))
	mux.Handle("/", ui.Handler())
	return mux
}

// requireKey checks the bearer key when watchdog.api_keys is set.
func (w *Watchdog) requireKey(h http.HandlerFunc) http.Handler {
	var sums [][sha256.Size]byte
	for _, k := range w.cfg.Keys() {
		sums = append(sums, sha256.Sum256([]byte(k)))
	}
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if len(sums) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			sum := sha256.Sum256([]byte(got))
			match := 0
			for _, s := range sums {
				match |= subtle.ConstantTimeCompare(sum[:], s[:])
			}
			if !ok || match == 0 {
				rw.Header().Set("WWW-Authenticate", `Bearer realm="rtm watchdog"`)
				writeJSON(rw, http.StatusUnauthorized, map[string]string{"error": "unauthorized", "message": "want Authorization: Bearer <a key of watchdog.api_keys>"})
				return
			}
		}
		h(rw, r)
	})
}

// events is the server-sent event stream of /v1/events.
func (w *Watchdog) events(rw http.ResponseWriter, r *http.Request) {
	fl, ok := rw.(http.Flusher)
	if !ok {
		writeJSON(rw, http.StatusInternalServerError, map[string]string{"error": "no_streaming"})
		return
	}
	sub := w.hub.subscribe()
	defer w.hub.unsubscribe(sub)
	rw.Header().Set("Content-Type", "text/event-stream")
	rw.Header().Set("Cache-Control", "no-cache")
	rw.Header().Set("X-Accel-Buffering", "no")
	rw.WriteHeader(http.StatusOK)
	var current []Alert
	current = append(current, w.Alerts(StateFiring)...)
	current = append(current, w.Alerts(StatePending)...)
	snap, _ := json.Marshal(map[string]any{"nodes": w.Nodes(), "alerts": current})
	fmt.Fprintf(rw, "event: snapshot\ndata: %s\n\n", snap)
	fl.Flush()
	ping := time.NewTicker(pingEvery)
	defer ping.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case m, ok := <-sub.ch:
			if !ok {
				return // shutting down, or this client fell too far behind
			}
			fmt.Fprintf(rw, "event: %s\ndata: %s\n\n", m.event, m.data)
			fl.Flush()
		case <-ping.C:
			fmt.Fprint(rw, ": ping\n\n")
			fl.Flush()
		}
	}
}

type hubMsg struct {
	event string
	data  []byte
}

type hubSub struct{ ch chan hubMsg }

// hub fans events out to the event streams. A client that falls 64 events
// behind is disconnected (it reconnects and gets a fresh snapshot) rather
// than slowing the watchdog.
type hub struct {
	mu     sync.Mutex
	subs   map[*hubSub]struct{}
	closed bool
}

func newHub() *hub { return &hub{subs: map[*hubSub]struct{}{}} }

func (h *hub) subscribe() *hubSub {
	s := &hubSub{ch: make(chan hubMsg, 64)}
	h.mu.Lock()
	if h.closed {
		close(s.ch)
	} else {
		h.subs[s] = struct{}{}
	}
	h.mu.Unlock()
	return s
}

func (h *hub) unsubscribe(s *hubSub) {
	h.mu.Lock()
	if _, ok := h.subs[s]; ok {
		delete(h.subs, s)
		close(s.ch)
	}
	h.mu.Unlock()
}

func (h *hub) publish(event string, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		select {
		case s.ch <- hubMsg{event, data}:
		default:
			delete(h.subs, s)
			close(s.ch)
		}
	}
}

func (h *hub) publishAlert(a *Alert) {
	b, _ := json.Marshal(a)
	h.publish("alert", b)
}

func (h *hub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for s := range h.subs {
		delete(h.subs, s)
		close(s.ch)
	}
}

func writeJSON(rw http.ResponseWriter, status int, v any) {
	rw.Header().Set("Content-Type", "application/json")
	rw.WriteHeader(status)
	_ = json.NewEncoder(rw).Encode(v)
}
