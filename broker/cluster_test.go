package broker_test

import (
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// startCluster starts n brokers in this process, named n0, n1, ..., on
// loopback ports picked by the kernel, joined by gossip with test timers,
// and returns them once every node's link to every other is up.
func startCluster(t testing.TB, n int) []*broker.Broker {
	t.Helper()
	var nodes []*broker.Broker
	seed := ""
	for i := range n {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, nil)
		if seed == "" {
			seed = b.GossipAddr()
		}
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	return nodes
}

func startClusterNode(t testing.TB, name, seed string, mutate func(*config.Broker, *config.Cluster)) *broker.Broker {
	t.Helper()
	return testcluster.Broker(t, name, seed, func(o *broker.Options) {
		if mutate != nil {
			mutate(&o.Config, &o.Cluster)
		}
	})
}

// waitMesh waits until every node has an up link to every other.
func waitMesh(t testing.TB, nodes ...*broker.Broker) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range nodes {
			up := 0
			for _, l := range b.Stats().Cluster.Links {
				if l.State == "up" {
					up++
				}
			}
			if up != len(nodes)-1 {
				return fmt.Errorf("%s: %d of %d links up", b.Name(), up, len(nodes)-1)
			}
		}
		return nil
	})
}

// waitRoutes waits until every node other than b holds want routes of b.
func waitRoutes(t testing.TB, nodes []*broker.Broker, b *broker.Broker, want int) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		for _, o := range nodes {
			if o == b {
				continue
			}
			if got := o.Stats().Cluster.RemoteRoutes[b.Name()]; got != want {
				return fmt.Errorf("%s holds %d routes of %s, want %d", o.Name(), got, b.Name(), want)
			}
		}
		return nil
	})
}

func dialV5(t testing.TB, b *broker.Broker, cp *paho.Connect) (*testutil.V5, *paho.Connack) {
	t.Helper()
	c, ca, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), cp)
	if err != nil {
		t.Fatalf("connect %s to %s: %v", cp.ClientID, b.Name(), err)
	}
	return c, ca
}

// dialV5Retry is dialV5 for a CONNECT the broker may refuse for a moment
// (0x88, Server Busy: the client's node was unreachable for its claim, a
// link that the test's fast timers dropped on a busy machine, or its
// session is moving): it is sent again every 100 ms, as a device does,
// for waitCond.
func dialV5Retry(t testing.TB, b *broker.Broker, cp *paho.Connect) (*testutil.V5, *paho.Connack) {
	t.Helper()
	start := time.Now()
	for {
		c, ca, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), cp)
		if err == nil {
			return c, ca
		}
		if time.Since(start) > waitCond {
			t.Fatalf("connect %s to %s: %v (retried for %v)", cp.ClientID, b.Name(), err, waitCond)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func subscribe(t testing.TB, c *testutil.V5, id int, opts ...paho.SubscribeOptions) {
	t.Helper()
	s := &paho.Subscribe{Subscriptions: opts}
	if id > 0 {
		s.Properties = &paho.SubscribeProperties{SubscriptionIdentifier: &id}
	}
	sa, err := c.Subscribe(testutil.Context(t, waitMsg), s)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range sa.Reasons {
		if r != opts[i].QoS {
			t.Fatalf("subscribe %s: reason 0x%02X", opts[i].Topic, r)
		}
	}
}

func TestClusterDeliversWithSingleNodeSemantics(t *testing.T) {
	nodes := startCluster(t, 3)

	// n0: the publisher, subscribed with No Local to what it publishes.
	pub, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "pub", CleanStart: true})
	subscribe(t, pub, 0, paho.SubscribeOptions{Topic: "s/#", QoS: 1, NoLocal: true})
	// n1: QoS 0 subscription (downgrade), a subscription identifier, and
	// retain as published.
	s1, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "s1", CleanStart: true})
	subscribe(t, s1, 7, paho.SubscribeOptions{Topic: "s/+", QoS: 0, RetainAsPublished: true})
	// n2: QoS 2 without retain as published, and a v3.1.1 client.
	s2, _ := dialV5(t, nodes[2], &paho.Connect{ClientID: "s2", CleanStart: true})
	subscribe(t, s2, 0, paho.SubscribeOptions{Topic: "s/#", QoS: 2})
	s3 := newClient(t, "v3", nodes[2].Addr(broker.ListenerTCP), "s3")
	s3.sub(t, "s/x", 1)
	waitRoutes(t, nodes, nodes[1], 1)
	waitRoutes(t, nodes, nodes[2], 2)

	expiry := uint32(100)
	props := &paho.PublishProperties{
		ContentType: "text/plain", ResponseTopic: "reply/here", CorrelationData: []byte{1, 2, 3},
		MessageExpiry: &expiry, User: paho.UserProperties{{Key: "k", Value: "v"}, {Key: "k", Value: "w"}},
	}
	if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "s/x", QoS: 1, Retain: true, Payload: []byte("hello"), Properties: props}); err != nil {
		t.Fatal(err)
	}

	m1 := s1.Next(t, waitMsg)
	if m1.QoS != 0 || !m1.Retain || m1.Properties.SubscriptionIdentifier == nil || *m1.Properties.SubscriptionIdentifier != 7 {
		t.Errorf("n1: QoS %d retain %t subscription id %v, want QoS 0 (downgraded), retain (as published), id 7", m1.QoS, m1.Retain, m1.Properties.SubscriptionIdentifier)
	}
	m2 := s2.Next(t, waitMsg)
	if m2.QoS != 1 || m2.Retain || m2.Properties.SubscriptionIdentifier != nil {
		t.Errorf("n2: QoS %d retain %t subscription id %v, want QoS 1 (as published), no retain, no id", m2.QoS, m2.Retain, m2.Properties.SubscriptionIdentifier)
	}
	for _, m := range []*paho.Publish{m1, m2} {
		p := m.Properties
		if string(m.Payload) != "hello" || p.ContentType != "text/plain" || p.ResponseTopic != "reply/here" ||
			!slices.Equal(p.CorrelationData, []byte{1, 2, 3}) || len(p.User) != 2 || p.User[0] != (paho.UserProperty{Key: "k", Value: "v"}) || p.User[1].Value != "w" {
			t.Errorf("properties lost across nodes: %+v payload %q", p, m.Payload)
		}
		if p.MessageExpiry == nil || *p.MessageExpiry == 0 || *p.MessageExpiry > 100 {
			t.Errorf("message expiry %v, want 1..100", p.MessageExpiry)
		}
	}
	if m := expectNext(t, s3, "s/x", []byte("hello")); m.qos != 1 {
		t.Errorf("v3.1.1 subscriber got QoS %d, want 1", m.qos)
	}

	// Once each: a second message is the next thing every subscriber
	// sees, and the publisher's No Local subscription saw neither.
	pub.Pub(t, "s/x", 0, false, "second")
	for _, c := range []*testutil.V5{s1, s2} {
		if m := c.Next(t, waitMsg); string(m.Payload) != "second" {
			t.Errorf("%s: got %q, want the second message once", c.ClientID(), m.Payload)
		}
	}
	expectNext(t, s3, "s/x", []byte("second"))
	pub.None(t, 200*time.Millisecond)

	// The expiry counts down: a message queued for an offline session on
	// n1 arrives with less time left.
	q, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "queued", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(300))}})
	subscribe(t, q, 0, paho.SubscribeOptions{Topic: "exp/t", QoS: 1})
	waitRoutes(t, nodes, nodes[1], 2)
	_ = q.Disconnect(&paho.Disconnect{})
	if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "exp/t", QoS: 1, Payload: []byte("x"), Properties: &paho.PublishProperties{MessageExpiry: &expiry}}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Inflight; n < 1 {
			return fmt.Errorf("n1 holds %d queued messages", n)
		}
		return nil
	})
	time.Sleep(2100 * time.Millisecond) // the countdown itself is what is tested
	q2, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "queued", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(300))}})
	if !ca.SessionPresent {
		t.Fatal("session not kept")
	}
	m := q2.Next(t, waitMsg)
	if m.Properties.MessageExpiry == nil || *m.Properties.MessageExpiry > 98 {
		t.Errorf("queued 2 s: expiry %v, want at most 98", m.Properties.MessageExpiry)
	}
}

func TestClusterOrderAcrossNodes(t *testing.T) {
	nodes := startCluster(t, 2)
	sub, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "sub", CleanStart: true})
	subscribe(t, sub, 0, paho.SubscribeOptions{Topic: "o/t", QoS: 1})
	waitRoutes(t, nodes, nodes[1], 1)
	// paho.mqtt.golang sends in call order without waiting for each
	// acknowledgement, so the messages are in flight together.
	pub, err := testutil.DialV3(t, nodes[0].Addr(broker.ListenerTCP), "pub", nil)
	if err != nil {
		t.Fatal(err)
	}
	const n = 1000
	var toks []mqtt3.Token
	for i := range n {
		toks = append(toks, pub.Publish("o/t", 1, false, strconv.Itoa(i)))
	}
	for _, tok := range toks {
		testutil.Wait(t, tok)
	}
	prev := -1
	for range n {
		m := sub.Next(t, waitMsg)
		i, _ := strconv.Atoi(string(m.Payload))
		if i <= prev {
			t.Fatalf("message %d after %d: order lost across nodes", i, prev)
		}
		prev = i
	}
}

// linkTraffic sums what b wrote to its links and forwarded.
func linkTraffic(b *broker.Broker) (msgs, forwarded int64) {
	cs := b.Stats().Cluster
	for _, l := range cs.Links {
		msgs += l.Messages
	}
	return msgs, cs.Forwarded
}

func TestClusterNoLinkTrafficWithoutRemoteSubscribers(t *testing.T) {
	nodes := startCluster(t, 3)
	local, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "local", CleanStart: true})
	subscribe(t, local, 0, paho.SubscribeOptions{Topic: "only/here", QoS: 1})
	far, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "far", CleanStart: true})
	subscribe(t, far, 0, paho.SubscribeOptions{Topic: "elsewhere/#", QoS: 1})
	waitRoutes(t, nodes, nodes[0], 1)
	waitRoutes(t, nodes, nodes[1], 1)

	// (Connecting does cross the links: the client ID is claimed.)
	pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
	var before [3][2]int64
	for i, b := range nodes {
		before[i][0], before[i][1] = linkTraffic(b)
	}
	for i := range 100 {
		pub.Pub(t, "only/here", byte(i%2), false, "x")
	}
	for range 100 {
		local.Next(t, waitMsg)
	}
	for i, b := range nodes {
		msgs, fwd := linkTraffic(b)
		if msgs != before[i][0] || fwd != before[i][1] {
			t.Errorf("%s: %d link messages and %d forwards for publishes no peer subscribes to, want 0",
				b.Name(), msgs-before[i][0], fwd-before[i][1])
		}
	}
	// ... and a matching publish does cross, to n1 only.
	pub.Pub(t, "elsewhere/x", 1, false, "y")
	if m := far.Next(t, waitMsg); string(m.Payload) != "y" {
		t.Fatalf("got %q", m.Payload)
	}
	if _, fwd := linkTraffic(nodes[0]); fwd != before[0][1]+1 {
		t.Errorf("n0 forwarded %d messages for one publish with one remote subscriber, want 1", fwd-before[0][1])
	}
}

func TestClusterRoutesFollowSubscriptions(t *testing.T) {
	nodes := startCluster(t, 2)
	// 20 clients on one filter are one route.
	var subs []*testutil.V5
	for i := range 20 {
		c, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: fmt.Sprintf("c%d", i), CleanStart: true})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: "sensors/+/temp", QoS: 0})
		subs = append(subs, c)
	}
	subscribe(t, subs[0], 0, paho.SubscribeOptions{Topic: "solo/#", QoS: 0})
	waitRoutes(t, nodes, nodes[1], 2)

	// Unsubscribe removes the route of its last subscriber.
	if _, err := subs[0].Unsubscribe(testutil.Context(t, waitMsg), &paho.Unsubscribe{Topics: []string{"solo/#"}}); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, nodes, nodes[1], 1)
	// A clean client's disconnect removes its subscriptions; the route
	// goes with the last one.
	for _, c := range subs[:19] {
		_ = c.Disconnect(&paho.Disconnect{})
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Connections; n != 1 {
			return fmt.Errorf("%d connections", n)
		}
		return nil
	})
	waitRoutes(t, nodes, nodes[1], 1)
	_ = subs[19].Conn.Close() // abrupt close: the same
	waitRoutes(t, nodes, nodes[1], 0)
}

func TestClusterRetainedMessages(t *testing.T) {
	nodes := startCluster(t, 3)
	pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
	pub.Pub(t, "r/a", 1, true, "first")
	pub.Pub(t, "r/a", 1, true, "second") // replaces
	pub.Pub(t, "r/b", 1, true, "b")

	for i, b := range nodes {
		c := testutil.MustV5(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("get%d", i))
		var got []string
		testutil.WaitFor(t, waitCond, func() error {
			subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/#", QoS: 1})
			got = got[:0]
			for {
				select {
				case m := <-c.Messages:
					got = append(got, m.Topic+"="+string(m.Payload))
					continue
				case <-time.After(200 * time.Millisecond):
				}
				break
			}
			slices.Sort(got)
			if !slices.Equal(got, []string{"r/a=second", "r/b=b"}) {
				return fmt.Errorf("%s: retained %v", b.Name(), got)
			}
			return nil
		})
	}

	// Cleared on n1: gone everywhere.
	testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "clear").Pub(t, "r/a", 1, true, "")
	for i, b := range nodes {
		testutil.WaitFor(t, waitCond, func() error {
			c := testutil.MustV5(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("after%d", i))
			subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/#", QoS: 1})
			m := c.Next(t, waitMsg)
			if m.Topic != "r/b" {
				return fmt.Errorf("%s: retained %s=%q after the clear", b.Name(), m.Topic, m.Payload)
			}
			select {
			case m := <-c.Messages:
				return fmt.Errorf("%s: retained %s=%q after the clear", b.Name(), m.Topic, m.Payload)
			case <-time.After(200 * time.Millisecond):
			}
			_ = c.Disconnect(&paho.Disconnect{})
			return nil
		})
	}
}

func TestClusterTakeoverMovesSession(t *testing.T) {
	nodes := startCluster(t, 3)
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "inbox/dev", QoS: 1})
	waitRoutes(t, nodes, nodes[0], 1)

	// Connected on n0, connects to n1: the old connection is told 0x8E.
	dev1, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Error("session not present after moving from n0 to n1")
	}
	select {
	case d := <-dev.Disconnects:
		if d.ReasonCode != 0x8E {
			t.Errorf("old connection: DISCONNECT 0x%02X, want 0x8E", d.ReasonCode)
		}
	case <-time.After(waitMsg):
		t.Fatal("old connection on n0 not disconnected")
	}
	waitRoutes(t, nodes, nodes[1], 1)
	waitRoutes(t, nodes, nodes[0], 0)

	// Offline on n1 with QoS 1 messages queued, connects to n2: they move.
	_ = dev1.Disconnect(&paho.Disconnect{})
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Connections; n != 0 {
			return fmt.Errorf("%d connections on n1", n)
		}
		return nil
	})
	pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
	for i := range 10 {
		pub.Pub(t, "inbox/dev", 1, false, strconv.Itoa(i))
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Inflight; n != 10 {
			return fmt.Errorf("n1 holds %d messages for the offline session, want 10", n)
		}
		return nil
	})
	dev2, ca := dialV5(t, nodes[2], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Error("session not present after moving from n1 to n2")
	}
	for i := range 10 {
		if m := dev2.Next(t, waitMsg); string(m.Payload) != strconv.Itoa(i) {
			t.Fatalf("queued message %d: got %q", i, m.Payload)
		}
	}
	// The subscription moved too.
	waitRoutes(t, nodes, nodes[2], 1)
	pub.Pub(t, "inbox/dev", 1, false, "after")
	if m := dev2.Next(t, waitMsg); string(m.Payload) != "after" {
		t.Fatalf("got %q after the move", m.Payload)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Sessions; n != 0 {
			return fmt.Errorf("n1 still holds %d sessions", n)
		}
		return nil
	})

	// Clean start elsewhere discards it.
	dev3, ca := dialV5(t, nodes[0], &paho.Connect{ClientID: "dev", CleanStart: true})
	if ca.SessionPresent {
		t.Error("clean start: session present")
	}
	waitRoutes(t, nodes, nodes[2], 0)
	_ = dev3
}

func TestClusterSharedSubscriptions(t *testing.T) {
	nodes := startCluster(t, 3)
	var members []*testutil.V5
	for i, b := range nodes {
		c, _ := dialV5(t, b, &paho.Connect{ClientID: fmt.Sprintf("m%d", i), CleanStart: true})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: "$share/workers/jobs/#", QoS: 1})
		members = append(members, c)
	}
	for _, b := range nodes {
		waitRoutes(t, nodes, b, 1)
	}
	// A publisher on each node: local members take their node's messages.
	// Then n0's member leaves: n0's messages spread over n1 and n2.
	const n = 3000
	seen := map[string]int{}
	got := make([]int, 3)
	collect := func(want int) {
		t.Helper()
		for len(seen) < want {
			select {
			case m := <-members[0].Messages:
				seen[string(m.Payload)]++
				got[0]++
			case m := <-members[1].Messages:
				seen[string(m.Payload)]++
				got[1]++
			case m := <-members[2].Messages:
				seen[string(m.Payload)]++
				got[2]++
			case <-time.After(waitMsg):
				t.Fatalf("%d of %d messages arrived", len(seen), want)
			}
		}
	}
	var pubs []mqtt3.Client
	for i, b := range nodes {
		c, err := testutil.DialV3(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("p%d", i), nil)
		if err != nil {
			t.Fatal(err)
		}
		pubs = append(pubs, c)
	}
	for i := range n / 2 {
		testutil.Wait(t, pubs[i%3].Publish("jobs/a", 1, false, fmt.Sprintf("a%d", i)))
	}
	collect(n / 2)
	_ = members[0].Disconnect(&paho.Disconnect{})
	waitRoutes(t, nodes, nodes[0], 0)
	before := slices.Clone(got)
	for i := range n / 2 {
		testutil.Wait(t, pubs[0].Publish("jobs/b", 1, false, fmt.Sprintf("b%d", i)))
	}
	collect(n)
	for p, k := range seen {
		if k != 1 {
			t.Errorf("message %s delivered %d times", p, k)
		}
	}
	if len(seen) != n {
		t.Errorf("%d distinct messages, want %d", len(seen), n)
	}
	for i := 1; i < 3; i++ {
		if d := got[i] - before[i]; d < n/2/4 {
			t.Errorf("member on n%d got %d of the %d messages published on n0 after its member left: not spread", i, d, n/2)
		}
	}
	t.Logf("per member: %v (after n0's member left: %d, %d)", got, got[1]-before[1], got[2]-before[2])
}

func TestClusterWillCrossesNodes(t *testing.T) {
	nodes := startCluster(t, 2)
	watcher, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "watcher", CleanStart: true})
	subscribe(t, watcher, 0, paho.SubscribeOptions{Topic: "status/+", QoS: 1})
	waitRoutes(t, nodes, nodes[1], 1)
	dev, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "dev", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "status/dev", QoS: 1, Payload: []byte("gone")}})
	_ = dev.Conn.Close() // abrupt: no DISCONNECT
	m := watcher.Next(t, waitMsg)
	if m.Topic != "status/dev" || string(m.Payload) != "gone" || m.QoS != 1 {
		t.Fatalf("got %s %q QoS %d, want the will", m.Topic, m.Payload, m.QoS)
	}
}
