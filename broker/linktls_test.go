package broker_test

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestLinkTLSAcrossNodes (issue 12 item 5): a publish on n0 reaches its
// subscriber on n1 through n0's link to n1, which runs through a proxy that
// records every byte. With link TLS, from cluster.secret alone (the
// default) or from cluster.link_tls_cert/key/ca, the message is delivered
// and neither its payload nor its topic nor the client IDs appear in the
// recording; with cluster.link_tls=off (the control: it shows the recording
// sees the link) they do.
func TestLinkTLSAcrossNodes(t *testing.T) {
	certFile, keyFile, _ := testutil.SelfSignedCert(t)
	for _, tc := range []struct {
		name   string
		mutate func(*config.Cluster)
		clear  bool
	}{
		{"secret", nil, false},
		{"certificates", func(c *config.Cluster) {
			c.LinkTLSCert, c.LinkTLSKey, c.LinkTLSCA = certFile, keyFile, certFile
		}, false},
		{"off", func(c *config.Cluster) { c.LinkTLS = "off" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			px := newLinkProxy(t)
			px.record.Store(true)
			mutate := func(_ *config.Broker, c *config.Cluster) {
				if tc.mutate != nil {
					tc.mutate(c)
				}
			}
			n0 := startClusterNode(t, "n0", "", mutate)
			n1 := startClusterNode(t, "n1", n0.GossipAddr(), func(b *config.Broker, c *config.Cluster) {
				mutate(b, c)
				c.LinkAdvertise = px.addr()
			})
			px.setTarget(n1.Stats().Cluster.Link)
			nodes := []*broker.Broker{n0, n1}
			waitMesh(t, nodes...)

			const topic, payload = "tls/topic-c4e1", "PAYLOAD-IN-CLEAR-91d2b7"
			sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "tls-subscriber")
			sub.Sub(t, topic, 1)
			waitRoutes(t, nodes, n1, 1)
			pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "tls-publisher")
			for range 3 {
				pub.Pub(t, topic, 1, false, payload)
			}
			for range 3 {
				if m := sub.Next(t, waitMsg); m.Topic != topic || string(m.Payload) != payload {
					t.Fatalf("n1's subscriber got %q on %s, want %q on %s", m.Payload, m.Topic, payload, topic)
				}
			}
			got := px.bytes()
			if len(got) == 0 {
				t.Fatal("the proxy recorded nothing: n0's link to n1 did not go through it")
			}
			for _, s := range []string{payload, topic, "tls-publisher", "tls-subscriber"} {
				if in := bytes.Contains(got, []byte(s)); in != tc.clear {
					t.Errorf("%q in n0's link bytes to n1: %t, want %t", s, in, tc.clear)
				}
			}
			if !tc.clear && (got[0] != 0x16 || got[1] != 0x03) {
				t.Errorf("n0's link to n1 does not start with a TLS handshake record: % x", got[:8])
			}
		})
	}
}

// TestLinkTLSBadFilesFailStart: link certificate files that do not load
// stop the broker at start, naming the keys.
func TestLinkTLSBadFilesFailStart(t *testing.T) {
	cfg := config.Defaults().Broker
	cfg.NodeName, cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "badtls", "127.0.0.1:0", "", "127.0.0.1:0"
	cfg.TLSAddr, cfg.WSSAddr = "", ""
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.LinkAddr, cc.Secret = "127.0.0.1:0", "127.0.0.1:0", testcluster.Secret
	missing := filepath.Join(t.TempDir(), "missing.pem")
	cc.LinkTLSCert, cc.LinkTLSKey, cc.LinkTLSCA = missing, missing, missing
	b, err := broker.New(broker.Options{Config: cfg, Cluster: cc, Auth: config.Auth{Devices: "anonymous"},
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	err = b.Start(context.Background())
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = b.Shutdown(ctx)
		t.Fatal("a broker with missing link certificate files started")
	}
	if !strings.Contains(err.Error(), "cluster.link_tls_cert") || !strings.Contains(err.Error(), "missing.pem") {
		t.Fatalf("start error %q does not name cluster.link_tls_cert and the file", err)
	}
}
