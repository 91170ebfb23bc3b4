package broker_test

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	mqtt3packets "github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/plugins/token"
)

// tokenCluster starts n nodes with auth.devices=token and returns them with
// a signer for their key.
func tokenCluster(t *testing.T, n int) ([]*broker.Broker, *token.Signer) {
	t.Helper()
	auth := config.Defaults().Auth
	auth.Devices, auth.TokenKeys = "token", testTokenKey
	var nodes []*broker.Broker
	seed := ""
	for i := range n {
		b := startClusterNodeAuth(t, fmt.Sprintf("n%d", i), seed, auth)
		if seed == "" {
			seed = b.GossipAddr()
		}
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	s, err := token.NewSigner([]string{testTokenKey})
	if err != nil {
		t.Fatal(err)
	}
	return nodes, s
}

// tokenConnect returns a CONNECT for id with a token (a service token if
// svc) valid for ttl.
func tokenConnect(t *testing.T, s *token.Signer, id string, svc bool, ttl time.Duration) *paho.Connect {
	t.Helper()
	issue := s.Issue
	if svc {
		issue = s.IssueService
	}
	tok, _, err := issue(id, ttl, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &paho.Connect{ClientID: id, CleanStart: true, Username: id, UsernameFlag: true, Password: []byte(tok), PasswordFlag: true}
}

// TestClusterWillACL: across nodes, a device cannot have a will delivered
// (or retained) on a topic it may not publish to: the CONNECT is refused
// with 0x87 (3.1.1: 5), and the subscribers on the other node receive
// nothing forged; a will it may publish still crosses the cluster.
func TestClusterWillACL(t *testing.T) {
	nodes, s := tokenCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	api, _ := dialV5(t, n0, tokenConnect(t, s, "api", true, time.Hour))
	bob, _ := dialV5(t, n1, tokenConnect(t, s, "bob", false, time.Hour))
	subscribe(t, bob, 0, paho.SubscribeOptions{Topic: "devices/bob/inbox", QoS: 1})
	carol, _ := dialV5(t, n1, tokenConnect(t, s, "carol", false, time.Hour))
	subscribe(t, carol, 0, paho.SubscribeOptions{Topic: "push/#", QoS: 1}, paho.SubscribeOptions{Topic: "status/#", QoS: 1})
	waitRoutes(t, nodes, n1, 3)

	for _, topic := range []string{"devices/bob/inbox", "push/news"} {
		for _, retain := range []bool{false, true} {
			name := fmt.Sprintf("will %s retain=%v", topic, retain)
			// MQTT 5
			cp := tokenConnect(t, s, "alice", false, time.Hour)
			cp.WillMessage = &paho.WillMessage{Topic: topic, QoS: 1, Retain: retain, Payload: []byte("forged")}
			c, ca, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), cp)
			if err == nil {
				t.Errorf("%s (v5): CONNECT accepted", name)
				_ = c.Conn.Close()
			} else if ca == nil || ca.ReasonCode != 0x87 {
				t.Errorf("%s (v5): %v, CONNACK %+v; want 0x87", name, err, ca)
			}
			// MQTT 3.1.1
			tok, _, _ := s.Issue("alice3", time.Hour, time.Now())
			var conn net.Conn
			c3, err := testutil.DialV3(t, n0.Addr(broker.ListenerTCP), "alice3", func(o *mqtt3.ClientOptions) {
				o.SetUsername("alice3").SetPassword(tok).SetWill(topic, "forged", 1, retain)
				o.SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt3.ClientOptions) (net.Conn, error) {
					var err error
					conn, err = net.DialTimeout("tcp", u.Host, waitMsg)
					return conn, err
				})
			})
			if err == nil {
				t.Errorf("%s (v3): CONNECT accepted", name)
				_ = conn.Close()
				_ = c3
			} else if !errors.Is(err, mqtt3packets.ErrorRefusedNotAuthorised) {
				t.Errorf("%s (v3): %v; want %v", name, err, mqtt3packets.ErrorRefusedNotAuthorised)
			}
			// Only the push API's session is left on n0 (once a forged
			// will, if any, was published).
			testutil.WaitFor(t, waitCond, func() error {
				if n := n0.Stats().Sessions; n != 1 {
					return fmt.Errorf("%d sessions on n0, want 1", n)
				}
				return nil
			})
		}
	}
	// Nothing forged crossed: the next message each gets is the marker the
	// push API publishes after the attempts, over the same link.
	api.Pub(t, "devices/bob/inbox", 1, false, "marker")
	api.Pub(t, "push/news", 1, false, "marker")
	if m := bob.Next(t, waitMsg); string(m.Payload) != "marker" {
		t.Fatalf("bob got %s %q, want the marker", m.Topic, m.Payload)
	}
	if m := carol.Next(t, waitMsg); string(m.Payload) != "marker" {
		t.Fatalf("carol got %s %q, want the marker", m.Topic, m.Payload)
	}
	// Nothing forged was retained, on either node.
	for _, n := range nodes {
		dave, _ := dialV5(t, n, tokenConnect(t, s, "dave-"+n.Name(), false, time.Hour))
		subscribe(t, dave, 0, paho.SubscribeOptions{Topic: "push/#", QoS: 1})
		api.Pub(t, "push/zz", 1, false, "marker 2")
		if m := dave.Next(t, waitMsg); string(m.Payload) != "marker 2" {
			t.Fatalf("new subscriber on %s got %s %q (retained=%v), want the marker", n.Name(), m.Topic, m.Payload, m.Retain)
		}
		if m := carol.Next(t, waitMsg); string(m.Payload) != "marker 2" {
			t.Fatalf("carol got %s %q, want the marker", m.Topic, m.Payload)
		}
	}

	// A will the device may publish crosses the cluster.
	cp := tokenConnect(t, s, "alice", false, time.Hour)
	cp.WillMessage = &paho.WillMessage{Topic: "status/alice", QoS: 1, Payload: []byte("gone")}
	alice, _ := dialV5(t, n0, cp)
	_ = alice.Conn.Close()
	if m := carol.Next(t, waitMsg); m.Topic != "status/alice" || string(m.Payload) != "gone" {
		t.Fatalf("carol got %s %q, want alice's will", m.Topic, m.Payload)
	}
}

// TestClusterTokenExpiry: a device whose token expires is disconnected
// (0xA0) by the node it is connected to, and its will reaches the
// subscribers on the other node.
func TestClusterTokenExpiry(t *testing.T) {
	nodes, s := tokenCluster(t, 2)
	watcher, _ := dialV5(t, nodes[1], tokenConnect(t, s, "watcher", false, time.Hour))
	subscribe(t, watcher, 0, paho.SubscribeOptions{Topic: "status/+", QoS: 1})
	waitRoutes(t, nodes, nodes[1], 1)
	cp := tokenConnect(t, s, "dev", false, 3*time.Second) // expires 2 to 3 s from now
	cp.WillMessage = &paho.WillMessage{Topic: "status/dev", QoS: 1, Payload: []byte("expired")}
	dev, _ := dialV5(t, nodes[0], cp)
	select {
	case d := <-dev.Disconnects:
		if d.ReasonCode != 0xA0 {
			t.Fatalf("DISCONNECT 0x%02X, want 0xA0", d.ReasonCode)
		}
	case <-time.After(waitCond):
		t.Fatal("not disconnected after the token expired")
	}
	if m := watcher.Next(t, waitMsg); m.Topic != "status/dev" || string(m.Payload) != "expired" {
		t.Fatalf("watcher got %s %q, want the will", m.Topic, m.Payload)
	}
}

// TestClusterDelayedWillCrossesNodes: a will with a delay, of a client
// whose session ends when it disconnects (session expiry 0), reaches the
// subscribers on the other node and is retained there, as an immediate
// will is (mochi patch 46: it was published on its own node only).
func TestClusterDelayedWillCrossesNodes(t *testing.T) {
	nodes := startCluster(t, 2)
	watcher, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "watcher", CleanStart: true})
	subscribe(t, watcher, 0, paho.SubscribeOptions{Topic: "status/+", QoS: 1})
	waitRoutes(t, nodes, nodes[1], 1)
	delay := uint32(1)
	dev, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "dev", CleanStart: true,
		WillMessage:    &paho.WillMessage{Topic: "status/dev", QoS: 1, Retain: true, Payload: []byte("gone")},
		WillProperties: &paho.WillProperties{WillDelayInterval: &delay}})
	_ = dev.Conn.Close() // abrupt: no DISCONNECT
	if m := watcher.Next(t, waitMsg); m.Topic != "status/dev" || string(m.Payload) != "gone" {
		t.Fatalf("watcher got %s %q, want the will", m.Topic, m.Payload)
	}
	late, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "late", CleanStart: true})
	subscribe(t, late, 0, paho.SubscribeOptions{Topic: "status/dev", QoS: 1})
	if m := late.Next(t, waitMsg); string(m.Payload) != "gone" || !m.Retain {
		t.Fatalf("late subscriber on the other node got %q retain=%v, want the retained will", m.Payload, m.Retain)
	}
}
