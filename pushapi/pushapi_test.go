package pushapi_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestNewReportsEveryProblem: New refuses options it cannot work with,
// naming every bad key at once, and does no I/O; Start refuses to run
// without a store.
func TestNewReportsEveryProblem(t *testing.T) {
	cfg := config.Defaults()
	cfg.PushAPI.Addr = "nowhere"
	cfg.Cluster.GossipAddr = ""
	_, err := pushapi.New(pushapi.Options{Config: cfg.PushAPI, Auth: config.Auth{Devices: "anonymous"}, Cluster: cfg.Cluster})
	if err == nil {
		t.Fatal("New accepted options without keys or gossip")
	}
	for _, want := range []string{"pushapi.addr", "pushapi.api_keys", "auth.token_keys", "broker.admin_keys", "cluster.gossip_addr"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s:\n%v", want, err)
		}
	}
	cfg = config.Defaults()
	cfg.PushAPI.APIKeys, cfg.Auth.TokenKeys = apiKey, tokenKey
	p, err := pushapi.New(pushapi.Options{Config: cfg.PushAPI, Auth: cfg.Auth, AdminKey: testcluster.AdminKey, Cluster: cfg.Cluster})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); !errors.Is(err, pushapi.ErrNoStore) || p.Addr() != "" {
		t.Fatalf("Start without a store: %v, addr %q", err, p.Addr())
	}
}

// TestLifecycle: Start binds at once (no broker needed), Start twice is an
// error, Shutdown is idempotent and leaves gossip.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	api := startAPI(t, "", st, nil)
	if api.Addr() == "" || api.GossipAddr() == "" || api.Name() != "api1" || api.Broker() != "" {
		t.Fatalf("addr %q gossip %q name %q broker %q", api.Addr(), api.GossipAddr(), api.Name(), api.Broker())
	}
	if err := api.Start(context.Background()); !errors.Is(err, pushapi.ErrStarted) {
		t.Errorf("second Start: %v, want ErrStarted", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 2 {
		if err := api.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	}
	if _, err := api.send(http.MethodGet, "/healthz", "", nil, nil); err == nil {
		t.Error("still serving HTTP after Shutdown")
	}

	// Never started: Shutdown is a no-op.
	cfg := config.Defaults()
	cfg.PushAPI.APIKeys, cfg.Auth.TokenKeys = apiKey, tokenKey
	p, err := pushapi.New(pushapi.Options{Config: cfg.PushAPI, Auth: cfg.Auth, AdminKey: testcluster.AdminKey, Cluster: cfg.Cluster, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Shutdown(ctx); err != nil || p.Addr() != "" {
		t.Errorf("Shutdown before Start: %v, addr %q", err, p.Addr())
	}
}

// TestEncodedIDs: device IDs and channels travel percent-encoded in paths,
// and are decoded exactly once.
func TestEncodedIDs(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	api := startAPI(t, "", st, nil)
	var sub pushapi.ChannelSubscription
	api.expect(http.MethodPut, "/v1/devices/a%25b%20c/channels/caf%C3%A9%20news", nil, http.StatusCreated, &sub)
	if sub.Device != "a%b c" || sub.Channel != "café news" {
		t.Fatalf("device %q channel %q, want %q %q", sub.Device, sub.Channel, "a%b c", "café news")
	}
	d, r := api.device("a%25b%20c")
	if r.status != http.StatusOK || d.ID != "a%b c" || len(d.Channels) != 1 || d.Channels[0].Channel != "café news" {
		t.Fatalf("GET device: %s", r)
	}
	var page pushapi.Subscribers
	api.expect(http.MethodGet, "/v1/channels/caf%C3%A9%20news/subscribers", nil, http.StatusOK, &page)
	if len(page.Subscribers) != 1 || page.Subscribers[0].Device != "a%b c" || page.NextCursor != nil {
		t.Fatalf("subscribers %+v", page)
	}
	api.expectError(http.MethodGet, "/v1/devices/x%2Fy", nil, http.StatusUnprocessableEntity, pushapi.CodeInvalidDeviceID)
}
