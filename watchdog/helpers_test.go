package watchdog_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/watchdog"
)

func TestMain(m *testing.M) { storetest.Main(m) }

// hookSink records webhook calls.
type hookSink struct {
	srv *httptest.Server
	mu  sync.Mutex
	got []watchdog.Event
}

func newHookSink(t *testing.T) *hookSink {
	h := &hookSink{}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var ev watchdog.Event
		if err := json.Unmarshal(body, &ev); err != nil {
			t.Errorf("webhook body %q: %v", body, err)
		}
		h.mu.Lock()
		h.got = append(h.got, ev)
		h.mu.Unlock()
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hookSink) events(rule, node, event string) []watchdog.Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []watchdog.Event
	for _, ev := range h.got {
		if ev.Rule == rule && ev.Node == node && ev.Event == event {
			out = append(out, ev)
		}
	}
	return out
}

// brokers starts n in-process brokers named b0.. with the given capacity.
func brokers(t *testing.T, n, capacity int) []*broker.Broker {
	return testcluster.Brokers(t, "b", n, func(o *broker.Options) { o.Config.Capacity = capacity })
}

// startWatchdog starts a watchdog joined to seed, polling every 200ms;
// mutate changes its configuration first.
func startWatchdog(t *testing.T, name, seed string, st *store.Store, mutate func(*config.Watchdog)) *watchdog.Watchdog {
	t.Helper()
	cfg := config.Defaults().Watchdog
	cfg.Name, cfg.Addr, cfg.Interval = name, "127.0.0.1:0", 200*time.Millisecond
	if mutate != nil {
		mutate(&cfg)
	}
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.Join, cc.Secret = "127.0.0.1:0", seed, testcluster.Secret
	_, logs := testutil.Logger(t)
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test_node", name)
	w, err := watchdog.New(watchdog.Options{Config: cfg, Cluster: cc, AdminKey: testcluster.AdminKey, Store: st,
		GossipTiming: cluster.TimingFast, Version: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := w.Shutdown(ctx); err != nil {
				t.Errorf("watchdog shutdown: %v", err)
			}
		}
		logs.Stop()
	})
	return w
}

// alert returns the alert of rule and node in state, if any.
func alert(w *watchdog.Watchdog, state, rule, node string) (watchdog.Alert, bool) {
	for _, a := range w.Alerts(state) {
		if a.Rule == rule && a.Node == node {
			return a, true
		}
	}
	return watchdog.Alert{}, false
}

func waitAlert(t *testing.T, w *watchdog.Watchdog, state, rule, node string, within time.Duration) watchdog.Alert {
	t.Helper()
	var got watchdog.Alert
	testutil.WaitFor(t, within, func() error {
		a, ok := alert(w, state, rule, node)
		if !ok {
			return fmt.Errorf("no %s alert %s on %q; alerts: %+v", state, rule, node, w.Alerts(""))
		}
		got = a
		return nil
	})
	return got
}

// connectN connects n MQTT clients to b and returns a function that
// disconnects them.
func connectN(t *testing.T, b *broker.Broker, n int, prefix string) func() {
	t.Helper()
	var cs []*testutil.V5
	for i := range n {
		cs = append(cs, testutil.MustV5(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("%s-%d", prefix, i)))
	}
	return func() {
		for _, c := range cs {
			_ = c.Conn.Close()
		}
	}
}

// waitWatched waits until w polled every broker.
func waitWatched(t *testing.T, w *watchdog.Watchdog, n int) {
	t.Helper()
	testutil.WaitFor(t, 20*time.Second, func() error {
		ok := 0
		for _, nd := range w.Nodes() {
			if nd.State == "alive" && nd.LastPoll != nil && nd.PollError == "" {
				ok++
			}
		}
		if ok < n {
			return fmt.Errorf("%d of %d brokers watched: %+v", ok, n, w.Nodes())
		}
		return nil
	})
}
