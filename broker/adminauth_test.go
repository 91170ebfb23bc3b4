package broker_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// adminCall sends one request to b's admin port with the Authorization
// header auth ("" sends none) and returns the status, the WWW-Authenticate
// header and the decoded JSON body.
func adminCall(t *testing.T, b *broker.Broker, method, path, body, auth string) (int, string, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+b.Addr(broker.ListenerAdmin)+path, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	_ = json.Unmarshal(raw, &m)
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), m
}

// TestAdminEndpointsNeedTheAdminKey (issue 12 item 4): every /v1 endpoint
// of the admin port (drain, undrain, server-side subscribe and unsubscribe,
// kick, stats, cluster view, drain state, group changes) answers 401 with a
// WWW-Authenticate challenge and a JSON error without a key, with a wrong
// one, or with another scheme, and does nothing; with a key of
// broker.admin_keys (either one: keys rotate) it works. /healthz, /readyz
// and /metrics stay open.
func TestAdminEndpointsNeedTheAdminKey(t *testing.T) {
	const other = "second-admin-key-0123456789"
	b := testcluster.Broker(t, "ak", "", func(o *broker.Options) { o.Config.AdminKeys = testcluster.AdminKey + "," + other })
	c := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "victim")
	good := "Bearer " + testcluster.AdminKey

	endpoints := []struct{ method, path, body string }{
		{"POST", "/v1/drain?evacuate=true", ""},
		{"POST", "/v1/undrain", ""},
		{"POST", "/v1/clients/victim/subscriptions", `{"filter":"devices/bob/inbox","qos":1}`},
		{"DELETE", "/v1/clients/victim/subscriptions?filter=devices/victim/inbox", ""},
		{"POST", "/v1/clients/victim/disconnect", ""},
		{"GET", "/v1/stats", ""},
		{"GET", "/v1/cluster", ""},
		{"GET", "/v1/drain", ""},
		{"POST", "/v1/groups/changes", `{"group":"g","removed":["victim"],"deleted":true}`},
		{"GET", "/v1/nosuch", ""}, // unknown paths are not probed for free either
	}
	for _, e := range endpoints {
		for _, auth := range []string{"", "Bearer wrong-key-0123456789abcdef", "Bearer " + testcluster.AdminKey[:10], "Basic " + testcluster.AdminKey, testcluster.AdminKey} {
			code, challenge, body := adminCall(t, b, e.method, e.path, e.body, auth)
			if code != http.StatusUnauthorized || !strings.HasPrefix(challenge, "Bearer ") || body["error"] != "unauthorized" || body["message"] == "" {
				t.Errorf("%s %s with Authorization %q: %d, WWW-Authenticate %q, body %v; want 401, a Bearer challenge and a JSON error",
					e.method, e.path, auth, code, challenge, body)
			}
		}
	}
	// Nothing happened: not draining, the client still connected and not
	// subscribed to bob's inbox.
	if b.Draining() {
		t.Fatal("a drain without the key took effect")
	}
	if _, _, st := adminCall(t, b, "GET", "/v1/stats", "", good); st["subscriptions"] != float64(0) || st["connections"] != float64(1) {
		t.Fatalf("after refused calls: stats %v, want 1 connection and no subscription", st)
	}

	// With a key: each works.
	for _, e := range []struct {
		method, path, body, auth string
		want                     int
	}{
		{"GET", "/v1/stats", "", good, 200},
		{"GET", "/v1/cluster", "", "bearer " + other, 200}, // the scheme is case-insensitive; any listed key
		{"POST", "/v1/drain", "", good, 200},
		{"GET", "/v1/drain", "", good, 200},
		{"POST", "/v1/undrain", "", "Bearer " + other, 200},
		{"POST", "/v1/clients/victim/subscriptions", `{"filter":"push/alerts","qos":1}`, good, 200},
		{"DELETE", "/v1/clients/victim/subscriptions?filter=push/alerts", "", good, 200},
		{"POST", "/v1/groups/changes", `{"group":"g","added":["victim"]}`, good, 200}, // nothing to apply without a store
		{"POST", "/v1/groups/changes", `{"group":"a/b"}`, good, 400},
		{"POST", "/v1/groups/changes", `{"group":"g","extra":1}`, good, 400},
		{"POST", "/v1/clients/victim/disconnect", "", good, 200},
	} {
		if code, _, body := adminCall(t, b, e.method, e.path, e.body, e.auth); code != e.want {
			t.Errorf("%s %s with a key: %d %v, want %d", e.method, e.path, code, body, e.want)
		}
	}
	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x98 {
			t.Errorf("kicked client got DISCONNECT 0x%02X, want 0x98", d.ReasonCode)
		}
	case <-time.After(10 * time.Second):
		t.Error("the client was not kicked by the authenticated call")
	}

	// The probes and the metrics need no key.
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		if code, _, _ := adminCall(t, b, "GET", path, "", ""); code != http.StatusOK {
			t.Errorf("GET %s without a key: %d, want 200", path, code)
		}
	}
	if code, _, _ := adminCall(t, b, "HEAD", "/healthz", "", ""); code != http.StatusOK {
		t.Errorf("HEAD /healthz without a key: %d, want 200", code)
	}
}

// TestAdminWithoutKeys: a broker with anonymous devices and no admin key
// starts, keeps its probes open and refuses every /v1 endpoint (403
// admin_disabled), whatever the request carries; with auth.devices=token it
// does not start, and the error names broker.admin_keys.
func TestAdminWithoutKeys(t *testing.T) {
	b := testcluster.Broker(t, "nokey", "", func(o *broker.Options) { o.Config.AdminKeys = "" })
	for _, auth := range []string{"", "Bearer ", "Bearer " + testcluster.AdminKey} {
		if code, _, body := adminCall(t, b, "POST", "/v1/drain", "", auth); code != http.StatusForbidden || body["error"] != "admin_disabled" {
			t.Errorf("POST /v1/drain (Authorization %q) on a broker without admin keys: %d %v, want 403 admin_disabled", auth, code, body)
		}
	}
	if b.Draining() {
		t.Fatal("drained without admin keys")
	}
	if code, _, _ := adminCall(t, b, "GET", "/healthz", "", ""); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}

	cfg := config.Defaults().Broker
	cfg.NodeName = "prod"
	_, err := broker.New(broker.Options{Config: cfg, Auth: config.Auth{Devices: "token", TokenKeys: testTokenKey},
		Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "broker.admin_keys") || !strings.Contains(err.Error(), "auth.devices=token") {
		t.Fatalf("New with token auth and no admin key: %v; want an error naming broker.admin_keys", err)
	}
	cfg.AdminKeys = "short"
	_, err = broker.New(broker.Options{Config: cfg, Auth: config.Auth{Devices: "anonymous"}, Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "broker.admin_keys") || !strings.Contains(err.Error(), "16 characters") {
		t.Fatalf("New with a 5-character admin key: %v; want an error naming broker.admin_keys", err)
	}
}

// TestAdminProfilerNeedsTheAdminKey: Go's profiler is on the admin port
// for `make profile`, and like the /v1 endpoints it answers 401 without a
// key; with one it serves a profile.
func TestAdminProfilerNeedsTheAdminKey(t *testing.T) {
	b := testcluster.Broker(t, "pprof", "", nil)
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/allocs", "/debug/pprof/profile?seconds=1"} {
		if code, challenge, _ := adminCall(t, b, "GET", path, "", ""); code != http.StatusUnauthorized || challenge == "" {
			t.Errorf("GET %s without a key: %d %q, want 401 with a challenge", path, code, challenge)
		}
	}
	req, _ := http.NewRequest("GET", "http://"+b.Addr(broker.ListenerAdmin)+"/debug/pprof/allocs", nil)
	req.Header.Set("Authorization", "Bearer "+testcluster.AdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	// A profile is gzipped protobuf.
	if resp.StatusCode != http.StatusOK || len(raw) < 2 || raw[0] != 0x1f || raw[1] != 0x8b {
		t.Fatalf("GET /debug/pprof/allocs with the key: %d, %d bytes", resp.StatusCode, len(raw))
	}
}
