package ui_test

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/watchdog/ui"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "write the dashboard screenshot to docs/img/dashboard.png")

// testAPI implements the watchdog's HTTP API contract (docs/monitoring.md)
// with data the test controls, beside the real ui.Handler.
type testAPI struct {
	key string // required Bearer key; "" for none

	mu      sync.Mutex
	nodes   []map[string]any
	alerts  []map[string]any
	frames  []string      // every event published, in order
	changed chan struct{} // closed and replaced on publish
	kick    chan struct{} // closed and replaced to end every open stream

	pageLoads atomic.Int32 // GETs of "/": a reload shows here
	streams   atomic.Int32
}

func newTestAPI(key string) *testAPI {
	a := &testAPI{key: key, changed: make(chan struct{}), kick: make(chan struct{})}
	now := time.Now().UTC()
	for i, c := range []struct {
		conns int
		in    float64
	}{{6120, 410.5}, {5480, 380.2}, {1930, 120.7}} {
		name := fmt.Sprintf("n%d", i+1)
		a.nodes = append(a.nodes, map[string]any{
			"name": name, "state": "alive", "draining": false, "drained_by_watchdog": false,
			"admin": fmt.Sprintf("127.0.0.1:910%d", i+1), "last_poll": now.Format(time.RFC3339), "poll_error": "",
			"stats": map[string]any{
				"connections": c.conns, "capacity": 10000, "load": float64(c.conns) / 10000, "subscriptions": c.conns * 3,
				"msgs_in_rate": c.in, "msgs_out_rate": c.in * 2.4, "dropped_rate": 0,
				"dropped_total": map[string]any{"queue_full": 0}, "inflight": 12, "retained": 140,
				"memory_bytes": 180<<20 + i*(23<<20), "goroutines": 14000 + c.conns*2, "uptime_seconds": 86400 + i*3600,
				"store_up": true, "history_queue": 0, "history_spool_bytes": 0,
				"links": []map[string]any{{"peer": "n" + fmt.Sprint((i+1)%3+1), "state": "up", "queued_bytes": 0},
					{"peer": "n" + fmt.Sprint((i+2)%3+1), "state": "up", "queued_bytes": 0}},
			},
		})
	}
	// n3 is sick and drained by the watchdog's memory rule.
	a.nodes[2]["draining"], a.nodes[2]["drained_by_watchdog"] = true, true
	a.alerts = append(a.alerts, map[string]any{
		"id": "01JTESTMEMORY000000000000", "rule": "memory_over_bytes", "node": "n3", "severity": "warning",
		"state": "firing", "value": 237 << 20, "threshold": 200 << 20, "action": "drain", "action_taken": "drained n3",
		"message":    "n3 uses 237 MiB, over 200 MiB for 30s: drained (router sends it no new devices)",
		"started_at": now.Add(-3 * time.Minute).Format(time.RFC3339), "fired_at": now.Add(-150 * time.Second).Format(time.RFC3339),
	})
	// An alert resolved earlier, so the list shows history as well.
	a.alerts = append(a.alerts, map[string]any{
		"id": "01JTESTRESOLVED0000000000", "rule": "connections_over_capacity_pct", "node": "n1", "severity": "warning",
		"state": "resolved", "value": 91.2, "threshold": 90, "action": "", "action_taken": "",
		"message":    "n1 holds 91.2% of its capacity (threshold 90% for 1m)",
		"started_at": now.Add(-40 * time.Minute).Format(time.RFC3339), "fired_at": now.Add(-39 * time.Minute).Format(time.RFC3339),
		"resolved_at": now.Add(-31 * time.Minute).Format(time.RFC3339),
	})
	return a
}

func (a *testAPI) series() map[string]any {
	now := time.Now().Unix()
	nodes := map[string]any{}
	for i, n := range a.nodes {
		var ts []int64
		var in, out, drop, conns []float64
		for k := 0; k < 120; k++ { // 10 minutes at 5 s
			ts = append(ts, now-int64(5*(120-k)))
			base := n["stats"].(map[string]any)["msgs_in_rate"].(float64)
			v := base * (1 + 0.25*math.Sin(float64(k)/9+float64(i)))
			in = append(in, v)
			out = append(out, v*2.4)
			d := 0.0
			if i == 1 && k > 70 && k < 82 {
				d = 35 * math.Sin(float64(k-70)/12*math.Pi)
			}
			drop = append(drop, d)
			conns = append(conns, float64(n["stats"].(map[string]any)["connections"].(int)))
		}
		nodes[n["name"].(string)] = map[string]any{"t": ts, "msgs_in_rate": in, "msgs_out_rate": out,
			"dropped_rate": drop, "connections": conns, "memory_bytes": conns}
	}
	return map[string]any{"interval_seconds": 5, "nodes": nodes}
}

// publish records an event for every stream, present and future.
func (a *testAPI) publish(event string, data any) {
	b, err := json.Marshal(data)
	if err != nil {
		panic(err)
	}
	a.mu.Lock()
	a.frames = append(a.frames, "event: "+event+"\ndata: "+string(b)+"\n\n")
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// failNode marks node failed and fires node_down on it, as the watchdog
// does when gossip declares a broker dead: a nodes event, then the alert.
func (a *testAPI) failNode(node string) {
	a.mu.Lock()
	for _, n := range a.nodes {
		if n["name"] == node {
			n["state"] = "failed"
			n["poll_error"] = "dial tcp: connection refused"
			n["stats"] = nil
		}
	}
	now := time.Now().UTC().Format(time.RFC3339)
	alert := map[string]any{"id": "01JTESTNODEDOWN" + node, "rule": "node_down", "node": node, "severity": "critical",
		"state": "firing", "value": 1, "threshold": 0, "action": "", "action_taken": "",
		"message": node + " failed in gossip (no answer to probes)", "started_at": now, "fired_at": now}
	a.alerts = append([]map[string]any{alert}, a.alerts...)
	nodes := map[string]any{"nodes": a.nodes}
	body, _ := json.Marshal(nodes) // a copy: the map is changed under mu only
	a.mu.Unlock()
	a.publish("nodes", json.RawMessage(body))
	a.publish("alert", alert)
}

// resolveWhileDisconnected ends every event stream and resolves the
// alert on node before the dashboard can reconnect: no stream carries the
// change, so the dashboard learns it only by asking again.
func (a *testAPI) resolveWhileDisconnected(rule, node string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	close(a.kick)
	a.kick = make(chan struct{})
	for _, al := range a.alerts {
		if al["rule"] == rule && al["node"] == node && al["state"] != "resolved" {
			al["state"] = "resolved"
			al["resolved_at"] = time.Now().UTC().Format(time.RFC3339)
		}
	}
	for _, n := range a.nodes {
		if n["name"] == node {
			n["state"] = "alive"
			n["poll_error"] = ""
		}
	}
}

func (a *testAPI) writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	a.mu.Lock()
	defer a.mu.Unlock()
	_ = json.NewEncoder(w).Encode(v)
}

func (a *testAPI) handler(t *testing.T) http.Handler {
	mux := http.NewServeMux()
	page := ui.Handler()
	mux.Handle("/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/" {
			a.pageLoads.Add(1)
		}
		page.ServeHTTP(w, r)
	}))
	v1 := http.NewServeMux()
	v1.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) {
		a.writeJSON(w, map[string]any{"nodes": a.nodes})
	})
	v1.HandleFunc("GET /v1/alerts", func(w http.ResponseWriter, r *http.Request) {
		a.writeJSON(w, map[string]any{"alerts": a.alerts})
	})
	v1.HandleFunc("GET /v1/series", func(w http.ResponseWriter, r *http.Request) {
		a.writeJSON(w, a.series())
	})
	v1.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		a.streams.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-store")
		fl := w.(http.Flusher)
		a.mu.Lock()
		var open []map[string]any
		for _, al := range a.alerts {
			if al["state"] != "resolved" {
				open = append(open, al)
			}
		}
		snap, _ := json.Marshal(map[string]any{"nodes": a.nodes, "alerts": open})
		next, kick := len(a.frames), a.kick
		a.mu.Unlock()
		fmt.Fprintf(w, ": hello\n\nevent: snapshot\ndata: %s\n\n", snap)
		fl.Flush()
		for {
			a.mu.Lock()
			frames, changed := a.frames[next:], a.changed
			next = len(a.frames)
			a.mu.Unlock()
			for _, f := range frames {
				if _, err := io.WriteString(w, f); err != nil {
					return
				}
			}
			fl.Flush()
			select {
			case <-changed:
			case <-kick:
				return
			case <-r.Context().Done():
				return
			}
		}
	})
	mux.Handle("/v1/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.key != "" && r.Header.Get("Authorization") != "Bearer "+a.key {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"error":"missing or wrong API key"}`)
			return
		}
		v1.ServeHTTP(w, r)
	}))
	return mux
}

// TestDashboardInBrowser loads the dashboard in headless Chromium against
// a test API: 3 nodes show, then a node_down alert fired on the event
// stream shows without a reload, and the page writes no console error.
func TestDashboardInBrowser(t *testing.T) {
	api := newTestAPI("")
	srv := httptest.NewServer(api.handler(t))
	t.Cleanup(srv.Close) // after the browser's cleanup, which ends its event stream
	b := testutil.NewBrowser(t, 1280, 900)

	b.Do(t, chromedp.Navigate(srv.URL+"/"))
	b.WaitTrue(t, testutil.DashboardNodeRows+" === 3", 30*time.Second, "3 nodes listed")
	b.WaitTrue(t, testutil.DashboardLive, 30*time.Second, "the event stream followed")
	for _, n := range []string{"n1", "n2", "n3"} {
		b.WaitTrue(t, testutil.DashboardNodeState(n, "alive"), 15*time.Second, n+" alive")
	}
	b.WaitTrue(t, `document.querySelectorAll("#chart-msgs polyline").length === 3`, 10*time.Second, "a rate line per node")
	b.WaitTrue(t, testutil.DashboardAlertShown("connections_over_capacity_pct", "n1", "resolved"), 15*time.Second, "the resolved alert from /v1/alerts")
	b.WaitTrue(t, testutil.DashboardAlertShown("memory_over_bytes", "n3", "firing"), 15*time.Second, "the firing alert of the snapshot")
	b.WaitTrue(t, `document.querySelector('#nodes tr[data-node="n3"] .draining').textContent === "drained by watchdog"`, 15*time.Second, "n3 shown drained")
	b.WaitTrue(t, `document.querySelector('#alerts tr[data-rule="memory_over_bytes"]').textContent.includes("drained n3")`, 15*time.Second, "the action taken shown")
	if b, err := chromedp.Run(b.Context(), chromedp.Evaluate[bool](testutil.DashboardAlertShown("node_down", "n2", "firing"))); err != nil || b {
		t.Fatalf("node_down shown before it fired (%v, %v)", b, err)
	}

	api.failNode("n2")
	b.WaitTrue(t, testutil.DashboardAlertShown("node_down", "n2", "firing"), 30*time.Second, "node_down on n2 firing")
	b.WaitTrue(t, testutil.DashboardNodeState("n2", "failed"), 10*time.Second, "n2 failed")
	b.WaitTrue(t, `document.getElementById("sum-firing").textContent === "2 firing"`, 15*time.Second, "the firing count")

	if n := api.pageLoads.Load(); n != 1 {
		t.Errorf("the page was loaded %d times, want 1: the alert must show without a reload", n)
	}
	if n := api.streams.Load(); n != 1 {
		t.Errorf("%d event streams opened, want 1", n)
	}
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("console errors: %v", errs)
	}
	shot := filepath.Join(t.TempDir(), "dashboard.png")
	b.Screenshot(t, shot)
	if *updateScreenshot {
		b.Screenshot(t, filepath.Join("..", "..", "docs", "img", "dashboard.png"))
	}

	// The stream breaks and the alert resolves meanwhile: the dashboard
	// reconnects by itself and shows the alert resolved, still without a
	// reload.
	api.resolveWhileDisconnected("node_down", "n2")
	b.WaitTrue(t, testutil.DashboardAlertShown("node_down", "n2", "resolved"), 30*time.Second, "node_down on n2 resolved after a reconnect")
	b.WaitTrue(t, testutil.DashboardNodeState("n2", "alive"), 10*time.Second, "n2 alive after a reconnect")
	b.WaitTrue(t, testutil.DashboardLive, 10*time.Second, "the stream followed again")
	if n := api.streams.Load(); n != 2 {
		t.Errorf("%d event streams opened, want 2 (one reconnect)", n)
	}
	if n := api.pageLoads.Load(); n != 1 {
		t.Errorf("the page was loaded %d times after the reconnect, want 1", n)
	}
	for _, m := range b.Messages() {
		if m.Type == chromedp.ConsoleError || m.IsException() {
			t.Errorf("console error: %v", m)
		}
	}
}

// With watchdog.api_keys set, the dashboard asks for the key on the first
// 401, keeps it in sessionStorage, and sends it with every call including
// the event stream.
func TestDashboardAsksForKey(t *testing.T) {
	const key = "operator-key-0123456789"
	api := newTestAPI(key)
	srv := httptest.NewServer(api.handler(t))
	t.Cleanup(srv.Close)
	b := testutil.NewBrowser(t, 1024, 768)

	b.Do(t, chromedp.Navigate(srv.URL+"/"))
	b.WaitTrue(t, `document.getElementById("key-dialog").open`, 30*time.Second, "the key dialog")
	if n, _ := chromedp.Run(b.Context(), chromedp.Evaluate[int](testutil.DashboardNodeRows)); n != 0 {
		t.Fatalf("%d nodes shown without a key", n)
	}
	b.Do(t, chromedp.SendKeys("#key-input", "wrong-key"), chromedp.Click(`#key-form button`))
	b.WaitTrue(t, `document.getElementById("key-dialog").open && !document.getElementById("key-error").classList.contains("hidden")`,
		30*time.Second, "the dialog again, saying the key was refused")
	b.WaitTrue(t, `document.getElementById("key-input").value === ""`, 15*time.Second, "the refused key cleared")
	b.Do(t, chromedp.SendKeys("#key-input", key), chromedp.Click(`#key-form button`))
	b.WaitTrue(t, testutil.DashboardNodeRows+" === 3", 30*time.Second, "3 nodes listed with the key")
	b.WaitTrue(t, testutil.DashboardLive, 30*time.Second, "the event stream followed with the key")
	stored, err := chromedp.Run(b.Context(), chromedp.Evaluate[string](`sessionStorage.getItem("rtm.watchdog.key")`))
	if err != nil || stored != key {
		t.Errorf("sessionStorage key = %q (%v), want the key entered", stored, err)
	}
	api.failNode("n3")
	b.WaitTrue(t, testutil.DashboardAlertShown("node_down", "n3", "firing"), 30*time.Second, "node_down on n3 firing")

	// The browser logs each refused request as an error; nothing else may fail.
	for _, m := range b.Errors() {
		if !(m.Source == "network" && strings.Contains(m.Text, "401")) {
			t.Errorf("console error: %v", m)
		}
	}
}
