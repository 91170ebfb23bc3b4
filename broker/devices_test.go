package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/plugins/token"
)

func TestMain(m *testing.M) { storetest.Main(m) }

func startBrokerWithStore(t *testing.T) (*broker.Broker, *store.Store) {
	t.Helper()
	st := storetest.Open(t)
	b := testcluster.Broker(t, "dev-node", "", func(o *broker.Options) {
		o.Cluster.GossipAddr, o.Store, o.Auth.TokenKeys = "", st, testTokenKey
	})
	return b, st
}

const testTokenKey = "test-token-key-0123456789"

// serviceClient connects as rtm's push API does: a service token, which
// may publish to push/# (devices may not).
func serviceClient(t *testing.T, b *broker.Broker, name string) *testutil.V5 {
	t.Helper()
	s, err := token.NewSigner([]string{testTokenKey})
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := s.IssueService(name, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c, _ := dialV5(t, b, &paho.Connect{ClientID: name, CleanStart: true, Username: name, UsernameFlag: true, Password: []byte(tok), PasswordFlag: true})
	return c
}

func waitPresence(t *testing.T, st *store.Store, id string, online bool) store.Presence {
	t.Helper()
	var p store.Presence
	testutil.WaitFor(t, waitCond, func() error {
		var err error
		if p, err = st.Presence(context.Background(), id); err != nil {
			return err
		}
		if !p.Seen || p.Online != online {
			return fmt.Errorf("presence of %s: %+v, want online=%t", id, p, online)
		}
		return nil
	})
	return p
}

func adminDo(t *testing.T, b *broker.Broker, method, path, body string) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+b.Addr(broker.ListenerAdmin)+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testcluster.AdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// TestDevicePresenceAndPushSubscriptions: the broker records presence and
// push subscriptions made over MQTT, and re-applies recorded ones at the
// next connect.
func TestDevicePresenceAndPushSubscriptions(t *testing.T) {
	b, st := startBrokerWithStore(t)
	ctx := testutil.Context(t, waitCond)
	dev, _ := dialV5(t, b, &paho.Connect{ClientID: "dev1", CleanStart: true})
	p := waitPresence(t, st, "dev1", true)
	if p.Node != "dev-node" {
		t.Errorf("presence node %q", p.Node)
	}
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "push/news", QoS: 1})
	testutil.WaitFor(t, waitCond, func() error {
		subs, err := st.DeviceChannels(ctx, "dev1")
		if err != nil || len(subs) != 1 || subs[0].Channel != "news" || subs[0].Via != store.ViaMQTT {
			return fmt.Errorf("channels of dev1: %+v %v", subs, err)
		}
		return nil
	})
	_ = dev.Disconnect(&paho.Disconnect{})
	waitPresence(t, st, "dev1", false)

	// Subscribed through the API while away: applied when it connects
	// (clean start: nothing of the old session is left).
	if _, err := st.AddPushSubscription(ctx, "dev1", "sport", store.ViaAPI); err != nil {
		t.Fatal(err)
	}
	dev, _ = dialV5(t, b, &paho.Connect{ClientID: "dev1", CleanStart: true})
	pub := serviceClient(t, b, "pushapi-test")
	testutil.WaitFor(t, waitCond, func() error {
		pub.Pub(t, "push/sport", 1, false, "goal")
		pub.Pub(t, "push/news", 1, false, "headline")
		got := map[string]bool{}
		for range 2 {
			select {
			case m := <-dev.Messages:
				got[m.Topic] = true
			case <-time.After(time.Second):
				return fmt.Errorf("got %v, want push/sport and push/news", got)
			}
		}
		return nil
	})

	// An explicit UNSUBSCRIBE forgets the channel.
	if _, err := dev.Unsubscribe(ctx, &paho.Unsubscribe{Topics: []string{"push/news"}}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		subs, _ := st.DeviceChannels(ctx, "dev1")
		if len(subs) != 1 || subs[0].Channel != "sport" {
			return fmt.Errorf("channels of dev1: %+v", subs)
		}
		return nil
	})
}

// TestAdminClientEndpoints: server-side subscriptions reach offline
// sessions (their messages queue), and kick disconnects with 0x98.
func TestAdminClientEndpoints(t *testing.T) {
	b, _ := startBrokerWithStore(t)
	expiry := ptr(uint32(300))
	dev, _ := dialV5(t, b, &paho.Connect{ClientID: "dev2", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	_ = dev.Disconnect(&paho.Disconnect{})
	testutil.WaitFor(t, waitCond, func() error {
		if n := b.Stats().Connections; n != 0 {
			return fmt.Errorf("%d connections", n)
		}
		return nil
	})
	if code, body := adminDo(t, b, "POST", "/v1/clients/dev2/subscriptions", `{"filter":"push/alerts","qos":1}`); code != 200 {
		t.Fatalf("subscribe offline session: %d %v", code, body)
	}
	if code, _ := adminDo(t, b, "POST", "/v1/clients/nobody/subscriptions", `{"filter":"push/alerts","qos":1}`); code != 404 {
		t.Errorf("unknown client: %d, want 404", code)
	}
	if code, _ := adminDo(t, b, "POST", "/v1/clients/dev2/subscriptions", `{"filter":"a/#/b","qos":1}`); code != 400 {
		t.Errorf("bad filter: %d, want 400", code)
	}
	serviceClient(t, b, "pushapi-test").Pub(t, "push/alerts", 1, false, "while away")
	dev, ca := dialV5(t, b, &paho.Connect{ClientID: "dev2", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatal("session lost")
	}
	if m := dev.Next(t, waitMsg); string(m.Payload) != "while away" {
		t.Fatalf("got %q", m.Payload)
	}
	if code, _ := adminDo(t, b, "DELETE", "/v1/clients/dev2/subscriptions?filter=push/alerts", ""); code != 200 {
		t.Errorf("unsubscribe: %d", code)
	}
	if code, body := adminDo(t, b, "POST", "/v1/clients/dev2/disconnect", ""); code != 200 {
		t.Fatalf("kick: %d %v", code, body)
	}
	select {
	case d := <-dev.Disconnects:
		if d.ReasonCode != 0x98 {
			t.Errorf("kick: DISCONNECT 0x%02X, want 0x98", d.ReasonCode)
		}
	case <-time.After(waitMsg):
		t.Fatal("not kicked")
	}
	testutil.WaitFor(t, waitCond, func() error {
		if code, _ := adminDo(t, b, "POST", "/v1/clients/dev2/disconnect", ""); code != 404 {
			return fmt.Errorf("kick of a disconnected client: %d, want 404", code)
		}
		return nil
	})
}

// TestTokenAuthAndACLAcrossNodes: with auth.devices=token, a device needs
// its token; and a forwarded message obeys the receiving node's ACL as a
// local one does: a device never receives another device's inbox.
func TestTokenAuthAndACLAcrossNodes(t *testing.T) {
	auth := config.Auth{Devices: "token", TokenKeys: testTokenKey}
	n0 := startClusterNodeAuth(t, "n0", "", auth)
	n1 := startClusterNodeAuth(t, "n1", n0.Stats().Cluster.Gossip, auth)
	waitMesh(t, n0, n1)
	signer, err := token.NewSigner([]string{testTokenKey})
	if err != nil {
		t.Fatal(err)
	}
	device := func(b *broker.Broker, id string) (*testutil.V5, *paho.Connack, error) {
		tok, _, err := signer.Issue(id, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: id, CleanStart: true,
			Username: id, UsernameFlag: true, Password: []byte(tok), PasswordFlag: true})
	}
	if _, ca, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), &paho.Connect{ClientID: "anon", CleanStart: true}); err == nil || ca == nil || ca.ReasonCode != 0x86 {
		t.Fatalf("no token: CONNACK %+v, err %v; want 0x86", ca, err)
	}
	alice, _, err := device(n1, "alice")
	if err != nil {
		t.Fatal(err)
	}
	snoop, _, err := device(n1, "snoop")
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, alice, 0, paho.SubscribeOptions{Topic: "devices/alice/inbox", QoS: 1})
	subscribe(t, snoop, 0, paho.SubscribeOptions{Topic: "devices/+/inbox", QoS: 1}) // allowed, but only its own is delivered
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 2)

	s, err := token.NewSigner([]string{testTokenKey})
	if err != nil {
		t.Fatal(err)
	}
	tok, _, _ := s.IssueService("pushapi-test", time.Hour, time.Now())
	svc, _ := dialV5(t, n0, &paho.Connect{ClientID: "pushapi-test", CleanStart: true, Username: "pushapi-test", UsernameFlag: true, Password: []byte(tok), PasswordFlag: true})
	svc.Pub(t, "devices/alice/inbox", 1, false, "for alice")
	svc.Pub(t, "devices/snoop/inbox", 1, false, "for snoop")
	if m := alice.Next(t, waitMsg); string(m.Payload) != "for alice" {
		t.Fatalf("alice got %q", m.Payload)
	}
	if m := snoop.Next(t, waitMsg); string(m.Payload) != "for snoop" {
		t.Fatalf("snoop got %q (another device's inbox crossed the cluster)", m.Payload)
	}
	snoop.None(t, 200*time.Millisecond)
}

func startClusterNodeAuth(t *testing.T, name, seed string, auth config.Auth) *broker.Broker {
	t.Helper()
	return testcluster.Broker(t, name, seed, func(o *broker.Options) { o.Auth = auth })
}
