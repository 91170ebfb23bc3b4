// Package testcluster starts broker nodes in the test's process, for the
// tests of every role that needs brokers: loopback ports picked by the
// kernel, gossip with test timers, a shared cluster secret, anonymous
// devices, logs to the test's log; each node is stopped when its test
// ends. Import it only from _test.go files.
package testcluster

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// Secret is the cluster secret of every node started here.
const Secret = "test secret"

// AdminKey is the admin key (broker.admin_keys) of every node started here.
const AdminKey = "test-admin-key-0123456789"

// Broker starts a broker named name, joined to the gossip address seed
// ("" starts a new cluster). mutate, if not nil, changes its options first
// (capacity, auth, store; an empty Cluster.GossipAddr runs it alone).
func Broker(t testing.TB, name, seed string, mutate func(*broker.Options)) *broker.Broker {
	t.Helper()
	cfg := config.Defaults().Broker
	cfg.NodeName = name
	cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "127.0.0.1:0", "", "127.0.0.1:0"
	cfg.AdminKeys = AdminKey
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.LinkAddr, cc.Join, cc.Secret = "127.0.0.1:0", "127.0.0.1:0", seed, Secret
	auth := config.Defaults().Auth
	auth.Devices = "anonymous"
	_, logs := testutil.Logger(t)
	opts := broker.Options{Config: cfg, Cluster: cc, GossipTiming: cluster.TimingFast, Auth: auth, Version: "test",
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test_node", name)}
	if mutate != nil {
		mutate(&opts)
	}
	b, err := broker.New(opts)
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
			t.Errorf("shutdown %s: %v", name, err)
		}
		logs.Stop()
	})
	return b
}

// Brokers starts n brokers named prefix0, prefix1, ..., joined to the
// first, each changed by mutate.
func Brokers(t testing.TB, prefix string, n int, mutate func(*broker.Options)) []*broker.Broker {
	t.Helper()
	var bs []*broker.Broker
	seed := ""
	for i := range n {
		b := Broker(t, fmt.Sprintf("%s%d", prefix, i), seed, mutate)
		if seed == "" {
			seed = b.GossipAddr()
		}
		bs = append(bs, b)
	}
	return bs
}
