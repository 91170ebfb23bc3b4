package broker_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// startBroker starts a broker on loopback ports picked by the kernel, with
// the defaults changed by mutate, and stops it when the test ends.
func startBroker(t testing.TB, mutate func(*config.Broker)) (*broker.Broker, *testutil.LogBuffer) {
	t.Helper()
	return startBrokerLevel(t, slog.LevelDebug, mutate)
}

// startBrokerLevel is startBroker logging from level on; tests that make
// mochi fail thousands of deliveries use Info, since its debug lines print
// each failed packet whole, payload included.
func startBrokerLevel(t testing.TB, level slog.Level, mutate func(*config.Broker)) (*broker.Broker, *testutil.LogBuffer) {
	t.Helper()
	cfg := config.Defaults().Broker
	cfg.NodeName = "test"
	cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.TLSAddr, cfg.WSSAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.AdminKeys = testcluster.AdminKey
	if mutate != nil {
		mutate(&cfg)
	}
	_, logs := testutil.Logger(t)
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: level}))
	b, err := broker.New(broker.Options{Config: cfg, Auth: config.Auth{Devices: "anonymous"}, Logger: log, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		logs.Stop()
	})
	return b, logs
}

// getJSON GETs url with the admin key.
func getJSON(t testing.TB, url string, v any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+testcluster.AdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("GET %s: %v in %s", url, err, body)
		}
	}
	return resp.StatusCode
}

func TestAdminEndpoints(t *testing.T) {
	b, _ := startBroker(t, nil)
	admin := "http://" + b.Addr(broker.ListenerAdmin)
	if code := getJSON(t, admin+"/healthz", nil); code != 200 {
		t.Fatalf("/healthz = %d", code)
	}
	if code := getJSON(t, admin+"/readyz", nil); code != 200 {
		t.Fatalf("/readyz = %d", code)
	}
	c := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "stats-client")
	c.Sub(t, "stats/#", 1)

	var st broker.Stats
	getJSON(t, admin+"/v1/stats", &st)
	if st.Connections != 1 || st.Subscriptions != 1 || st.Node != "test" || st.Listeners[broker.ListenerTCP] != b.Addr(broker.ListenerTCP) {
		t.Fatalf("/v1/stats = %+v, want 1 connection, 1 subscription, node test, tcp listener %s", st, b.Addr(broker.ListenerTCP))
	}

	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"rtm_broker_connections 1", "rtm_broker_subscriptions 1", "rtm_broker_capacity 100000",
		`rtm_broker_messages_dropped_total{qos="1",reason="queue_full"} 0`, `rtm_broker_messages_dropped_total{qos="1",reason="session_full"} 0`, "go_goroutines", "process_resident_memory_bytes",
		"rtm_broker_backpressure_waits_total 0", "rtm_broker_backpressure_wait_seconds_total 0", "rtm_broker_backpressure_stalls_total 0",
		"rtm_broker_backpressure_stalled_skips_total 0", "rtm_broker_backpressure_receive_quota_waits_total 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestShutdownDisconnectsWithServerShuttingDown(t *testing.T) {
	b, _ := startBroker(t, nil)
	c := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "bye")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x8B {
			t.Fatalf("DISCONNECT reason 0x%02X, want 0x8B", d.ReasonCode)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no DISCONNECT within 5s of shutdown")
	}
	if b.Ready() {
		t.Fatal("broker ready after shutdown")
	}
	if _, _, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: "late"}); err == nil {
		t.Fatal("a client connected after shutdown")
	}
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("second shutdown: %v", err)
	}
}
