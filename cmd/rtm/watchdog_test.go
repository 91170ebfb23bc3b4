package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/watchdog"
)

// webhookReceiver records the watchdog's webhook calls.
type webhookReceiver struct {
	srv *httptest.Server
	mu  sync.Mutex
	got []watchdog.Event
	at  []time.Time
}

func newWebhookReceiver(t *testing.T) *webhookReceiver {
	r := &webhookReceiver{}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var ev watchdog.Event
		if err := json.Unmarshal(body, &ev); err != nil {
			t.Errorf("webhook body %q: %v", body, err)
		}
		r.mu.Lock()
		r.got, r.at = append(r.got, ev), append(r.at, time.Now())
		r.mu.Unlock()
	}))
	t.Cleanup(r.srv.Close)
	return r
}

// find returns when an event of rule, node and state arrived.
func (r *webhookReceiver) find(rule, node, state string) (watchdog.Event, time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, ev := range r.got {
		if ev.Rule == rule && ev.Node == node && ev.State == state && ev.Event != "action" {
			return ev, r.at[i], true
		}
	}
	return watchdog.Event{}, time.Time{}, false
}

// watchdogProc is an `rtm watchdog` process.
type watchdogProc struct {
	p    *proc
	addr string
}

// startWatchdog starts a watchdog joined to f's cluster, polling every
// 500ms, and returns once it serves.
func startWatchdog(t *testing.T, f *clusterFixture, name string, env ...string) *watchdogProc {
	t.Helper()
	args := []string{"watchdog", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", f.seed,
		"--cluster-secret", f.secret, "--store-uri", f.storeURI, "--data", t.TempDir(), "--log-format", "json"}
	env = append([]string{"RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String(), "RTM_WATCHDOG_INTERVAL=500ms",
		"RTM_WATCHDOG_NAME=" + name}, env...)
	w := &watchdogProc{p: start(t, env, args...)}
	testutil.WaitFor(t, 60*time.Second, func() error {
		for _, line := range w.p.stderr.Lines() {
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "watchdog started" {
				w.addr = rec.Addr
				return nil
			}
		}
		return fmt.Errorf("no 'watchdog started' line yet")
	})
	return w
}

func (w *watchdogProc) get(t *testing.T, path string, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+w.addr+path, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d", path, res.StatusCode)
	}
	if err := json.NewDecoder(res.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

func (w *watchdogProc) nodes(t *testing.T) map[string]watchdog.NodeJSON {
	var body struct {
		Nodes []watchdog.NodeJSON `json:"nodes"`
	}
	w.get(t, "/v1/nodes", &body)
	out := map[string]watchdog.NodeJSON{}
	for _, n := range body.Nodes {
		out[n.Name] = n
	}
	return out
}

func (w *watchdogProc) alerts(t *testing.T, state string) []watchdog.Alert {
	var body struct {
		Alerts []watchdog.Alert `json:"alerts"`
	}
	w.get(t, "/v1/alerts?state="+state, &body)
	return body.Alerts
}

// waitWatched waits until the watchdog polled every named broker.
func (w *watchdogProc) waitWatched(t *testing.T, names ...string) {
	t.Helper()
	testutil.WaitFor(t, 30*time.Second, func() error {
		nodes := w.nodes(t)
		for _, name := range names {
			n, ok := nodes[name]
			if !ok || n.State != "alive" || n.LastPoll == nil || n.PollError != "" {
				return fmt.Errorf("%s not watched yet: %+v", name, n)
			}
		}
		return nil
	})
}

// TestWatchdogNodeDown: three brokers and a watchdog as processes. A broker
// killed with SIGKILL raises node_down, seen by the API, a webhook and
// $SYS/rtm/alerts subscribers; restarted, the alert resolves and the webhook
// hears it; a fourth broker is watched with nothing configured.
func TestWatchdogNodeDown(t *testing.T) {
	f := newClusterFixture(t)
	acl := "RTM_AUTH_ACL=allow sub $SYS/rtm/alerts"
	n1 := f.start("n1", acl)
	n2 := f.start("n2", acl)
	n3 := f.start("n3", acl)
	waitFormed(t, n1, n2, n3)
	hook := newWebhookReceiver(t)
	wd := startWatchdog(t, f, "wd1", "RTM_WATCHDOG_WEBHOOKS="+hook.srv.URL)
	wd.waitWatched(t, "n1", "n2", "n3")

	sub := testutil.MustV5(t, n1.mqtt, "alerts-reader")
	sub.Sub(t, "$SYS/rtm/alerts", 1)

	// The dashboard in a real browser, against these processes: three
	// nodes, following the event stream. A marker set on the page now
	// would be gone after a reload.
	b := testutil.NewBrowser(t, 1280, 900)
	b.Do(t, chromedp.Navigate("http://"+wd.addr+"/"))
	b.WaitTrue(t, testutil.DashboardNodeRows+" === 3", 30*time.Second, "the dashboard lists the 3 brokers")
	b.WaitTrue(t, testutil.DashboardLive, 30*time.Second, "the dashboard follows the event stream")
	b.Do(t, chromedp.Evaluate[chromedp.Void]("window.rtmE2E = 1"))

	killed := time.Now()
	if err := n3.p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	var firedAt time.Time
	testutil.WaitFor(t, 30*time.Second, func() error {
		for _, a := range wd.alerts(t, "firing") {
			if a.Rule == "node_down" && a.Node == "n3" {
				firedAt = time.Now()
				return nil
			}
		}
		return fmt.Errorf("node_down n3 not firing")
	})
	var hookAt time.Time
	testutil.WaitFor(t, 30*time.Second, func() error {
		ev, at, ok := hook.find("node_down", "n3", "firing")
		if !ok {
			return fmt.Errorf("no webhook for node_down n3 yet")
		}
		if ev.Severity != "critical" || ev.FiredAt == nil || ev.ID == "" {
			t.Fatalf("webhook event %+v: want severity critical, fired_at and id", ev)
		}
		hookAt = at
		return nil
	})
	t.Logf("kill -9 → firing in the API within %v, webhook after %v", firedAt.Sub(killed).Round(time.Millisecond), hookAt.Sub(killed).Round(time.Millisecond))
	// docs/watchdog.md: about six probe intervals (1.2 s here); generous
	// for a loaded machine running the race detector.
	if d := firedAt.Sub(killed); d > 15*time.Second {
		t.Fatalf("node_down fired %v after kill -9, want well within 15s at a %v probe interval", d, probeInterval)
	}
	// The dashboard shows it without a reload, and nothing went wrong on
	// the page.
	b.WaitTrue(t, testutil.DashboardAlertShown("node_down", "n3", "firing"), 30*time.Second, "the dashboard shows node_down n3 firing")
	b.WaitTrue(t, testutil.DashboardNodeState("n3", "failed"), 30*time.Second, "the dashboard shows n3 failed")
	b.WaitTrue(t, "window.rtmE2E === 1", 5*time.Second, "the same page, not reloaded")
	if errs := b.Errors(); len(errs) > 0 {
		t.Fatalf("dashboard console errors: %v", errs)
	}
	b.Screenshot(t, filepath.Join(t.TempDir(), "dashboard-node-down.png"))

	// $SYS/rtm/alerts carries it (other alerts, e.g. link_down, may come
	// first).
	deadline := time.Now().Add(20 * time.Second)
	for {
		m := sub.Next(t, time.Until(deadline))
		var ev watchdog.Event
		if err := json.Unmarshal(m.Payload, &ev); err != nil {
			t.Fatalf("$SYS/rtm/alerts payload %q: %v", m.Payload, err)
		}
		if ev.Rule == "node_down" && ev.Node == "n3" && ev.State == "firing" {
			break
		}
	}

	f.restart(n3)
	testutil.WaitFor(t, 30*time.Second, func() error {
		if _, _, ok := hook.find("node_down", "n3", "resolved"); !ok {
			return fmt.Errorf("no resolution webhook yet")
		}
		return nil
	})
	for _, a := range wd.alerts(t, "firing") {
		if a.Rule == "node_down" {
			t.Fatalf("still firing after the restart: %+v", a)
		}
	}
	resolved := wd.alerts(t, "resolved")
	if len(resolved) == 0 || resolved[0].Rule != "node_down" || resolved[0].ResolvedAt == nil {
		t.Fatalf("resolved alerts %+v: want node_down first, with resolved_at", resolved)
	}

	// A fourth broker is watched at once, with no configuration change.
	f.start("n4")
	wd.waitWatched(t, "n1", "n2", "n3", "n4")
	if n := hook.count("node_down", "n3", "firing"); n != 1 {
		t.Fatalf("%d firing webhooks for node_down n3, want exactly 1", n)
	}
}

func (r *webhookReceiver) count(rule, node, state string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, ev := range r.got {
		if ev.Rule == rule && ev.Node == node && ev.State == state && ev.Event == state {
			n++
		}
	}
	return n
}

// TestRoleExitsWhenItsGossipNameIsTaken: a router still joining its seed in
// the background finds, once the seed is up, that another member uses its
// name. It cannot take part in the cluster: the process exits 1 instead of
// running on with only a log line.
func TestRoleExitsWhenItsGossipNameIsTaken(t *testing.T) {
	f := newClusterFixture(t)
	f.start("b1")
	late := freeGossipAddr(t)
	env := []string{"RTM_ROUTER_NAME=dup", "RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()}
	r1 := start(t, env, "router", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", late,
		"--cluster-secret", f.secret, "--log-format", "json")
	r2 := start(t, env, "router", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", f.seed,
		"--cluster-secret", f.secret, "--log-format", "json")
	testutil.WaitFor(t, 30*time.Second, func() error {
		if !strings.Contains(r2.stderr.String(), "router started") {
			return fmt.Errorf("second router not started")
		}
		return nil
	})
	// The seed r1 waits for comes up, in the cluster where r2 is "dup".
	f.run(&clusterNode{name: "b2", data: t.TempDir(), mqtt: "127.0.0.1:0", admin: "127.0.0.1:0", gossip: late, link: "127.0.0.1:0"})
	if code := r1.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("exit code %d, want 1", code)
	}
	if !strings.Contains(r1.stderr.String(), "name already in use") {
		t.Fatalf("stderr does not name the clash:\n%s", r1.stderr.String())
	}
}

// freeGossipAddr returns a loopback address whose port is free for TCP and
// UDP now.
func freeGossipAddr(t *testing.T) string {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if pc, err := net.ListenPacket("udp", addr); err == nil {
			pc.Close()
			return addr
		}
	}
	t.Fatal("no free gossip port")
	return ""
}
