package watchdog_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/router"
	"github.com/rtm-dev/rtm/watchdog"
)

// capacityRule is connections_over_capacity_pct at threshold pct, for d.
func capacityRule(pct int, d time.Duration, action string, nodes string) func(*config.Watchdog) {
	return func(c *config.Watchdog) {
		c.Rules.CapacityPct = config.Rule{Threshold: pct, For: d, Severity: "warning", Action: action, Nodes: nodes}
	}
}

// TestThresholdRuleFiresAfterItsDurationAndResolves drives a broker's
// connections over a low capacity percentage: the alert is pending first,
// fires once the condition held for the rule's duration, and resolves when
// the connections drop; a flap shorter than the duration never fires.
func TestThresholdRuleFiresAfterItsDurationAndResolves(t *testing.T) {
	bs := brokers(t, 1, 10)
	hook := newHookSink(t)
	const hold = 2 * time.Second
	w := startWatchdog(t, "wd", bs[0].GossipAddr(), nil, func(c *config.Watchdog) {
		capacityRule(20, hold, "", "")(c) // over 2 of 10 connections
		c.Webhooks = hook.srv.URL
	})
	waitWatched(t, w, 1)

	// A flap: 3 connections, seen pending, gone before 2s.
	drop := connectN(t, bs[0], 3, "flap")
	waitAlert(t, w, "pending", "connections_over_capacity_pct", "b0", 10*time.Second)
	drop()
	testutil.WaitFor(t, 10*time.Second, func() error {
		if a, ok := alert(w, "pending", "connections_over_capacity_pct", "b0"); ok {
			return &pendingErr{a}
		}
		return nil
	})
	time.Sleep(hold + 500*time.Millisecond) // the flap's duration would be over by now: still nothing may fire
	if a, ok := alert(w, "firing", "connections_over_capacity_pct", "b0"); ok {
		t.Fatalf("a flap shorter than the rule's duration fired: %+v", a)
	}
	if evs := hook.events("connections_over_capacity_pct", "b0", "firing"); len(evs) != 0 {
		t.Fatalf("webhook notified a flap: %+v", evs)
	}

	// Held: fires after the duration, resolves when the connections drop.
	drop = connectN(t, bs[0], 3, "held")
	a := waitAlert(t, w, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
	if a.FiredAt == nil || a.FiredAt.Sub(a.StartedAt) < hold {
		t.Fatalf("fired %v after it started, want at least %v: %+v", a.FiredAt.Sub(a.StartedAt), hold, a)
	}
	if a.Value <= 20 || a.Threshold != 20 || a.Severity != "warning" {
		t.Fatalf("alert %+v: want value over 20, threshold 20, severity warning", a)
	}
	drop()
	r := waitAlert(t, w, "resolved", "connections_over_capacity_pct", "b0", 20*time.Second)
	if r.ID != a.ID || r.ResolvedAt == nil {
		t.Fatalf("resolved %+v, want the firing alert %s with resolved_at", r, a.ID)
	}
	testutil.WaitFor(t, 10*time.Second, func() error {
		if len(hook.events("connections_over_capacity_pct", "b0", "firing")) != 1 || len(hook.events("connections_over_capacity_pct", "b0", "resolved")) != 1 {
			return &hookErr{hook}
		}
		return nil
	})
}

type pendingErr struct{ a watchdog.Alert }

func (e *pendingErr) Error() string { return "still pending: " + e.a.ID }

type hookErr struct{ h *hookSink }

func (e *hookErr) Error() string {
	e.h.mu.Lock()
	defer e.h.mu.Unlock()
	b, _ := json.Marshal(e.h.got)
	return "webhook events: " + string(b)
}

// startRouter runs a router joined to seed.
func startRouter(t *testing.T, seed string) *router.Router {
	t.Helper()
	cfg := config.Defaults().Router
	cfg.Name, cfg.Addr = "r1", "127.0.0.1:0"
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.Join, cc.Secret = "127.0.0.1:0", seed, testcluster.Secret
	_, logs := testutil.Logger(t)
	r, err := router.New(router.Options{Config: cfg, Cluster: cc, GossipTiming: cluster.TimingFast, Version: "test",
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = r.Shutdown(ctx)
		logs.Stop()
	})
	return r
}

// routed returns the brokers the router names in n answers.
func routed(t *testing.T, r *router.Router, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := range n {
		res, err := http.Get("http://" + r.Addr() + "/v1/route?client_id=d" + strings.Repeat("x", i%3) + string(rune('a'+i%26)))
		if err != nil {
			t.Fatal(err)
		}
		var rt router.Route
		_ = json.NewDecoder(res.Body).Decode(&rt)
		res.Body.Close()
		out[rt.Node]++
	}
	return out
}

// TestDrainActionTakesASickNodeOutAndBack: a rule with action drain on one
// broker only: while it fires the node is drained and the router stops
// naming it; once it resolves the node is undrained and named again.
func TestDrainActionTakesASickNodeOutAndBack(t *testing.T) {
	bs := brokers(t, 3, 10)
	r := startRouter(t, bs[0].GossipAddr())
	w := startWatchdog(t, "wd", bs[0].GossipAddr(), nil, capacityRule(20, 0, "drain", "b1"))
	waitWatched(t, w, 3)
	testutil.WaitFor(t, 20*time.Second, func() error {
		if got := routed(t, r, 12); got["b1"] == 0 {
			return &routeErr{got}
		}
		return nil
	})

	drop := connectN(t, bs[1], 3, "sick")
	a := waitAlert(t, w, "firing", "connections_over_capacity_pct", "b1", 20*time.Second)
	testutil.WaitFor(t, 10*time.Second, func() error {
		a, _ = alert(w, "firing", "connections_over_capacity_pct", "b1")
		if a.ActionTaken != "drained b1" {
			return &actionErr{a}
		}
		return nil
	})
	// Within a bound (gossip carries the drain tag), the router stops naming it.
	testutil.WaitFor(t, 10*time.Second, func() error {
		if got := routed(t, r, 12); got["b1"] != 0 {
			return &routeErr{got}
		}
		return nil
	})
	if got := routed(t, r, 30); got["b1"] != 0 {
		t.Fatalf("router named the drained node: %v", got)
	}
	nodes := map[string]watchdog.NodeJSON{}
	for _, n := range w.Nodes() {
		nodes[n.Name] = n
	}
	if !nodes["b1"].DrainedByWatchdog || nodes["b0"].DrainedByWatchdog {
		t.Fatalf("nodes %+v: want b1 (only) drained by the watchdog", nodes)
	}

	drop()
	waitAlert(t, w, "resolved", "connections_over_capacity_pct", "b1", 20*time.Second)
	testutil.WaitFor(t, 20*time.Second, func() error {
		if got := routed(t, r, 12); got["b1"] == 0 {
			return &routeErr{got}
		}
		return nil
	})
}

type routeErr struct{ got map[string]int }

func (e *routeErr) Error() string { b, _ := json.Marshal(e.got); return "routes: " + string(b) }

type actionErr struct{ a watchdog.Alert }

func (e *actionErr) Error() string { return "action_taken " + e.a.ActionTaken }

// TestDrainGuardRails: never more than watchdog.max_drained nodes, and
// never the last healthy one.
func TestDrainGuardRails(t *testing.T) {
	t.Run("max_drained", func(t *testing.T) {
		bs := brokers(t, 3, 10)
		w := startWatchdog(t, "wd", bs[0].GossipAddr(), nil, capacityRule(20, 0, "drain", "b0,b1"))
		waitWatched(t, w, 3)
		connectN(t, bs[0], 3, "s0")
		connectN(t, bs[1], 3, "s1")
		waitAlert(t, w, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
		waitAlert(t, w, "firing", "connections_over_capacity_pct", "b1", 20*time.Second)
		checkDrained(t, w, 1, "max_drained")
	})
	t.Run("last_healthy", func(t *testing.T) {
		bs := brokers(t, 2, 10)
		w := startWatchdog(t, "wd", bs[0].GossipAddr(), nil, func(c *config.Watchdog) {
			capacityRule(20, 0, "drain", "")(c)
			c.MaxDrained = 2
		})
		waitWatched(t, w, 2)
		connectN(t, bs[0], 3, "s0")
		connectN(t, bs[1], 3, "s1")
		waitAlert(t, w, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
		waitAlert(t, w, "firing", "connections_over_capacity_pct", "b1", 20*time.Second)
		checkDrained(t, w, 1, "last healthy")
	})
}

// checkDrained asserts, over a few rounds, that exactly want nodes are
// drained and the other firing alerts say why not.
func checkDrained(t *testing.T, w *watchdog.Watchdog, want int, why string) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, func() error {
		drained, refused := 0, 0
		for _, a := range w.Alerts("firing") {
			switch {
			case strings.HasPrefix(a.ActionTaken, "drained "):
				drained++
			case strings.Contains(a.ActionTaken, why):
				refused++
			}
		}
		if drained != want || refused == 0 {
			return &alertsErr{w.Alerts("firing")}
		}
		return nil
	})
	for range 5 {
		time.Sleep(300 * time.Millisecond) // rounds pass: the guard rail holds
		n := 0
		for _, nd := range w.Nodes() {
			if nd.DrainedByWatchdog || nd.Draining {
				n++
			}
		}
		if n != want {
			t.Fatalf("%d nodes drained, want %d: %+v", n, want, w.Nodes())
		}
	}
}

type alertsErr struct{ a []watchdog.Alert }

func (e *alertsErr) Error() string { b, _ := json.Marshal(e.a); return "firing: " + string(b) }

// TestRestartedWatchdogDoesNotNotifyAgain: a firing alert is kept in the
// store; a watchdog started after the first one stopped adopts it without a
// second firing notification, and notifies its resolution once.
func TestRestartedWatchdogDoesNotNotifyAgain(t *testing.T) {
	st := storetest.Open(t)
	bs := brokers(t, 1, 10)
	hook := newHookSink(t)
	mutate := func(c *config.Watchdog) {
		capacityRule(20, 0, "", "")(c)
		c.Webhooks = hook.srv.URL
	}
	w1 := startWatchdog(t, "wd1", bs[0].GossipAddr(), st, mutate)
	drop := connectN(t, bs[0], 3, "c")
	first := waitAlert(t, w1, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
	testutil.WaitFor(t, 10*time.Second, func() error {
		if len(hook.events("connections_over_capacity_pct", "b0", "firing")) != 1 {
			return &hookErr{hook}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w1.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	w2 := startWatchdog(t, "wd2", bs[0].GossipAddr(), st, mutate)
	waitWatched(t, w2, 1)
	a := waitAlert(t, w2, "firing", "connections_over_capacity_pct", "b0", 10*time.Second)
	if a.ID != first.ID {
		t.Fatalf("restarted watchdog has alert %s, want the stored %s", a.ID, first.ID)
	}
	time.Sleep(time.Second) // rounds pass
	if n := len(hook.events("connections_over_capacity_pct", "b0", "firing")); n != 1 {
		t.Fatalf("%d firing notifications after the restart, want 1", n)
	}
	drop()
	waitAlert(t, w2, "resolved", "connections_over_capacity_pct", "b0", 20*time.Second)
	testutil.WaitFor(t, 10*time.Second, func() error {
		if len(hook.events("connections_over_capacity_pct", "b0", "resolved")) != 1 {
			return &hookErr{hook}
		}
		return nil
	})
}

// TestTwoWatchdogsNotifyOnce: two watchdogs sharing a store watch the same
// broker; each alert change is notified once between them.
func TestTwoWatchdogsNotifyOnce(t *testing.T) {
	st := storetest.Open(t)
	bs := brokers(t, 1, 10)
	hook := newHookSink(t)
	mutate := func(c *config.Watchdog) {
		capacityRule(20, 0, "", "")(c)
		c.Webhooks = hook.srv.URL
	}
	w1 := startWatchdog(t, "wd1", bs[0].GossipAddr(), st, mutate)
	w2 := startWatchdog(t, "wd2", bs[0].GossipAddr(), st, mutate)
	waitWatched(t, w1, 1)
	waitWatched(t, w2, 1)
	for round := range 2 {
		drop := connectN(t, bs[0], 3, fmt.Sprintf("c%d", round))
		a1 := waitAlert(t, w1, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
		a2 := waitAlert(t, w2, "firing", "connections_over_capacity_pct", "b0", 20*time.Second)
		if a1.ID != a2.ID {
			t.Fatalf("round %d: the watchdogs have different alerts %s and %s for one incident", round, a1.ID, a2.ID)
		}
		drop()
		waitAlert(t, w1, "resolved", "connections_over_capacity_pct", "b0", 20*time.Second)
		waitAlert(t, w2, "resolved", "connections_over_capacity_pct", "b0", 20*time.Second)
		time.Sleep(time.Second) // any duplicate would be on its way by now
		if f, r := len(hook.events("connections_over_capacity_pct", "b0", "firing")), len(hook.events("connections_over_capacity_pct", "b0", "resolved")); f != round+1 || r != round+1 {
			t.Fatalf("after %d incidents: %d firing and %d resolved notifications, want %d each", round+1, f, r, round+1)
		}
	}
}
