package broker_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// dropped is b's count of messages dropped for reason at QoS qos.
func dropped(b *broker.Broker, reason string, qos int) int64 {
	return b.Stats().DroppedByReason[reason][strconv.Itoa(qos)]
}

// waitDropped waits until b counts want drops for reason at each QoS
// (index 0, 1, 2).
func waitDropped(t testing.TB, b *broker.Broker, reason string, want [3]int64) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		var got [3]int64
		for q := range got {
			got[q] = dropped(b, reason, q)
		}
		if got != want {
			return fmt.Errorf("%s: dropped %s by QoS %v, want %v", b.Name(), reason, got, want)
		}
		return nil
	})
}

// publishCode publishes and returns the reason code of the PUBACK (QoS 1)
// or PUBREC (QoS 2).
func publishCode(t testing.TB, c *testutil.V5, topic string, qos byte, payload []byte) byte {
	t.Helper()
	pr, err := c.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: topic, QoS: qos, Payload: payload})
	if pr == nil {
		t.Fatalf("publish %s at QoS %d: no acknowledgement: %v", topic, qos, err)
		return 0
	}
	return pr.ReasonCode
}

// expectPayloads reads len(want) messages from c and checks their payloads
// (big ones by prefix).
func expectPayloads(t testing.TB, c *testutil.V5, want ...string) {
	t.Helper()
	for _, w := range want {
		m := c.Next(t, waitMsg)
		if got := string(m.Payload); got != w && (len(got) < 1000 || !strings.HasPrefix(got, w)) {
			t.Fatalf("%s: got %q, want %q", c.ClientID(), got[:min(len(got), 32)], w)
		}
	}
}

// dialV3Lost connects an MQTT 3.1.1 client and returns a channel closed
// when its connection is lost.
func dialV3Lost(t testing.TB, b *broker.Broker, id string) (*testutil.V3, <-chan struct{}) {
	t.Helper()
	lost := make(chan struct{})
	var once sync.Once
	c, err := testutil.DialV3(t, b.Addr(broker.ListenerTCP), id, func(o *mqtt3.ClientOptions) {
		o.SetConnectionLostHandler(func(mqtt3.Client, error) { once.Do(func() { close(lost) }) })
	})
	if err != nil {
		t.Fatal(err)
	}
	return c, lost
}

// expectV3Closed publishes at QoS 1 from a v3.1.1 client and expects the
// broker to close its connection instead of acknowledging [MQTT-3.3.5-2].
func expectV3Closed(t testing.TB, c *testutil.V3, lost <-chan struct{}, topic string, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, 1, false, payload)
	select {
	case <-lost:
	case <-time.After(waitMsg):
		t.Fatalf("v3.1.1 publisher still connected after a publish that cannot be queued (token error %v)", tok.Error())
	}
}

// TestClusterRefusesWhatItCannotQueue: a QoS 1/2 publish that cannot be
// queued for every peer whose routes match it is refused (MQTT 5: 0x97 for
// a full link queue, 0x80 otherwise; MQTT 3.1.1: connection closed), is
// not delivered on the publisher's node either, and is counted; QoS 0 is
// delivered locally and counted for the peer it missed. Before the fix
// every one of these publishes was acknowledged with success.
func TestClusterRefusesWhatItCannotQueue(t *testing.T) {
	t.Run("link queue full", func(t *testing.T) {
		var nodes []*broker.Broker
		seed := ""
		for i := range 2 {
			b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(b *config.Broker, c *config.Cluster) {
				b.MaxPacketSize = 4 << 20
				c.LinkQueueBytes = 1 << 20 // the smallest allowed
			})
			seed = b.GossipAddr()
			nodes = append(nodes, b)
		}
		waitMesh(t, nodes...)
		far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
		far.Sub(t, "q/#", 2)
		near := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "near")
		near.Sub(t, "q/#", 2)
		waitRoutes(t, nodes, nodes[1], 1)
		pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")

		// One message larger than the whole link queue: never queued.
		big := func(tag string) []byte { return append([]byte(tag), bytes.Repeat([]byte{'x'}, 1<<20+1000)...) }
		if code := publishCode(t, pub, "q/1", 1, big("big-q1")); code != 0x97 {
			t.Errorf("QoS 1: PUBACK reason 0x%02X, want 0x97", code)
		}
		if code := publishCode(t, pub, "q/2", 2, big("big-q2")); code != 0x97 {
			t.Errorf("QoS 2: PUBREC reason 0x%02X, want 0x97", code)
		}
		// QoS 0, retained: delivered here, dropped for n1 (counted once
		// though neither the message nor the retained update reaches n1).
		pub.Pub(t, "q/0", 0, true, string(big("big-q0")))
		// A retained update no route of n1 matches: counted too (n1 gets
		// it in its next link snapshot).
		pub.Pub(t, "elsewhere/r", 0, true, string(big("big-r")))
		pub.Pub(t, "q/ok", 1, false, "after")
		expectPayloads(t, near, "big-q0", "after") // the refused ones were not delivered here either
		expectPayloads(t, far, "after")

		v3, lost := dialV3Lost(t, nodes[0], "pub3")
		expectV3Closed(t, v3, lost, "q/3", big("big-v3"))
		pub.Pub(t, "q/ok", 1, false, "after v3")
		expectPayloads(t, near, "after v3")
		expectPayloads(t, far, "after v3")
		waitDropped(t, nodes[0], "link_queue_full", [3]int64{2, 2, 1})
	})

	t.Run("oversize", func(t *testing.T) {
		// A CONNECT with the longest client ID exceeds the default
		// broker.max_connect_size (64 KiB).
		bigConnect := func(b *config.Broker, _ *config.Cluster) { b.MaxConnectSize = 128 << 10 }
		n0 := startClusterNode(t, "n0", "", bigConnect)
		nodes := []*broker.Broker{n0, startClusterNode(t, "n1", n0.GossipAddr(), bigConnect)}
		waitMesh(t, nodes...)
		far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
		far.Sub(t, "o/#", 1)
		waitRoutes(t, nodes, nodes[1], 1)
		// The client ID travels with the message (No Local): with the
		// longest one MQTT allows, a packet at broker.max_packet_size no
		// longer fits a link frame.
		pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), strings.Repeat("c", 65535))
		payload := bytes.Repeat([]byte{'x'}, 1<<20-11)
		if code := publishCode(t, pub, "o/t", 1, payload); code != 0x80 {
			t.Errorf("PUBACK reason 0x%02X, want 0x80", code)
		}
		pub.Pub(t, "o/t", 1, false, "small")
		expectPayloads(t, far, "small")
		waitDropped(t, nodes[0], "link_oversize", [3]int64{0, 1, 0})
	})

	t.Run("routes without a link", func(t *testing.T) {
		var nodes []*broker.Broker
		seed := ""
		for i := range 2 {
			b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(_ *config.Broker, c *config.Cluster) {
				c.FailedPeerHold = 0 // no held link to take the messages
			})
			seed = b.GossipAddr()
			nodes = append(nodes, b)
		}
		waitMesh(t, nodes...)
		far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
		far.Sub(t, "r/#", 1)
		near := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "near")
		near.Sub(t, "r/#", 1)
		waitRoutes(t, nodes, nodes[1], 1)

		// n0 believes n1 failed: it closes its link and drops n1's routes,
		// but n1, alive, links again and sends them back.
		markFailed(nodes[0], "n1")
		testutil.WaitFor(t, waitCond, func() error {
			cs := nodes[0].Stats().Cluster
			if len(cs.Links) != 0 || cs.RemoteRoutes["n1"] != 1 {
				return fmt.Errorf("links %+v, routes of n1 %d; want no link and 1 route", cs.Links, cs.RemoteRoutes["n1"])
			}
			return nil
		})
		pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
		if code := publishCode(t, pub, "r/1", 1, []byte("refused")); code != 0x80 {
			t.Errorf("PUBACK reason 0x%02X, want 0x80", code)
		}
		pub.Pub(t, "r/0", 0, false, "qos0")
		v3, lost := dialV3Lost(t, nodes[0], "pub3")
		expectV3Closed(t, v3, lost, "r/3", []byte("refused v3"))
		expectPayloads(t, near, "qos0")
		// A will has nobody to refuse: published here, counted for n1.
		willer, _, err := testutil.DialV5(t, nodes[0].Addr(broker.ListenerTCP), &paho.Connect{ClientID: "willer", CleanStart: true,
			WillMessage: &paho.WillMessage{Topic: "r/will", QoS: 1, Payload: []byte("will")}})
		if err != nil {
			t.Fatal(err)
		}
		_ = willer.Conn.Close() // without DISCONNECT: the will is published
		expectPayloads(t, near, "will")
		waitDropped(t, nodes[0], "no_link", [3]int64{1, 3, 0})

		nodes[0].SetTestMembers(nil)
		waitMesh(t, nodes...)
		pub.Pub(t, "r/ok", 1, false, "healed")
		expectPayloads(t, far, "healed")
	})
}

// markFailed makes b see peer as failed in gossip.
func markFailed(b *broker.Broker, peer string) {
	b.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == peer {
				ms[i].Status = cluster.StatusFailed
			}
		}
		return ms
	})
}

// keepAliveBut makes b see every member but failed alive, whatever gossip
// says (on a busy machine the test's fast gossip timers can declare a live
// node failed for a moment).
func keepAliveBut(b *broker.Broker, failed string) {
	b.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name != failed && ms[i].Status == cluster.StatusFailed {
				ms[i].Status = cluster.StatusAlive
			}
		}
		return ms
	})
}

// linkProxy is a loopback TCP proxy for a node's link address: it forwards
// to target, and cut closes every connection and refuses new ones until
// the next setTarget. While frozen, what the dialer sends is thrown away.
type linkProxy struct {
	ln     net.Listener
	frozen atomic.Bool
	mu     sync.Mutex
	target string
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup

	// record, when set, keeps every byte forwarded, both ways, in recorded.
	record   atomic.Bool
	recMu    sync.Mutex
	recorded []byte
}

func newLinkProxy(t testing.TB) *linkProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &linkProxy{ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *linkProxy) addr() string { return p.ln.Addr().String() }

// bytes returns what the proxy recorded.
func (p *linkProxy) bytes() []byte {
	p.recMu.Lock()
	defer p.recMu.Unlock()
	return append([]byte(nil), p.recorded...)
}

func (p *linkProxy) setTarget(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = addr
}

func (p *linkProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = ""
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

func (p *linkProxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		if target == "" {
			_ = in.Close()
			continue
		}
		out, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			_ = in.Close()
			continue
		}
		p.mu.Lock()
		p.conns[in], p.conns[out] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		pipe := func(dst, src net.Conn, freezes bool) {
			defer p.wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				if n > 0 && p.record.Load() {
					p.recMu.Lock()
					p.recorded = append(p.recorded, buf[:n]...)
					p.recMu.Unlock()
				}
				if n > 0 && !(freezes && p.frozen.Load()) {
					if _, werr := dst.Write(buf[:n]); werr != nil {
						break
					}
				}
				if err != nil {
					break
				}
			}
			_ = dst.Close()
			_ = src.Close()
		}
		go pipe(out, in, true)
		go pipe(in, out, false)
	}
}

// proxiedPair starts n0 and n1, n1's node link reached through a proxy,
// each changed by mutate, and returns them linked, with the proxy.
func proxiedPair(t testing.TB, mutate func(*config.Broker, *config.Cluster)) ([]*broker.Broker, *linkProxy) {
	t.Helper()
	px := newLinkProxy(t)
	n0 := startClusterNode(t, "n0", "", mutate)
	n1 := startClusterNode(t, "n1", n0.GossipAddr(), func(b *config.Broker, c *config.Cluster) {
		if mutate != nil {
			mutate(b, c)
		}
		c.LinkAdvertise = px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	nodes := []*broker.Broker{n0, n1}
	waitMesh(t, nodes...)
	return nodes, px
}

// linkState is the state of from's link to peer ("" if it has none).
func linkState(from *broker.Broker, peer string) (state string, queued int) {
	for _, l := range from.Stats().Cluster.Links {
		if l.Peer == peer {
			return l.State, l.QueueLen
		}
	}
	return "", 0
}

// TestClusterSuspicionHealsWithoutLoss: messages acknowledged while a
// peer's link is down stay queued when gossip marks the peer failed, and
// reach its subscriber, in order, once the same process is back. Before
// the fix the link was closed at the failure and its queue thrown away.
func TestClusterSuspicionHealsWithoutLoss(t *testing.T) {
	nodes, px := proxiedPair(t, nil)
	far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
	far.Sub(t, "h/t", 1)
	waitRoutes(t, nodes, nodes[1], 1)
	pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")

	px.cut() // n0's link to n1 is down; gossip still says alive
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(nodes[0], "n1"); st != "connecting" {
			return fmt.Errorf("n0's link to n1 %q, want connecting", st)
		}
		return nil
	})
	const n = 200
	for i := range n {
		pub.Pub(t, "h/t", 1, false, strconv.Itoa(i)) // acknowledged: queued for n1
	}
	markFailed(nodes[0], "n1")
	testutil.WaitFor(t, waitCond, func() error {
		// (Before the fix the link was gone at this point, with its queue.)
		// At least n: a claim or route message sent before the cut may
		// still be unacknowledged on a loaded machine.
		if st, q := linkState(nodes[0], "n1"); st == "connecting" || st == "held" && q < n {
			return fmt.Errorf("n0's link to n1 %q with %d queued, want held with at least %d", st, q, n)
		}
		return nil
	})

	// The suspicion heals: the same n1 is alive and reachable again.
	nodes[0].SetTestMembers(nil)
	px.setTarget(nodes[1].Stats().Cluster.Link)
	for i := range n {
		m := far.Next(t, waitMsg)
		if got := string(m.Payload); got != strconv.Itoa(i) {
			t.Fatalf("message %d: got %q (lost or out of order)", i, got)
		}
	}
	waitMesh(t, nodes...)
	for _, r := range []string{"link_closed", "peer_restarted", "no_link"} {
		if d := dropped(nodes[0], r, 1); d != 0 {
			t.Errorf("%d QoS 1 messages dropped as %s", d, r)
		}
	}
}

// TestClusterLostQueueCounted: what was queued for a peer and can no longer
// reach it is counted, by reason: the peer restarted (a new process got
// the link: its old sessions are gone), it left, or it stayed failed past
// cluster.failed_peer_hold. Before the fix the queue was resent to the
// restarted process, or thrown away uncounted.
func TestClusterLostQueueCounted(t *testing.T) {
	for _, tc := range []struct {
		name, reason string
	}{{"peer restarted", "peer_restarted"}, {"peer left", "link_closed"}, {"failed too long", "link_closed"}} {
		t.Run(tc.name, func(t *testing.T) {
			nodes, px := proxiedPair(t, func(_ *config.Broker, c *config.Cluster) { c.FailedPeerHold = time.Second })
			far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
			far.Sub(t, "l/#", 1)
			far0 := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far0")
			far0.Sub(t, "l/#", 0)
			waitRoutes(t, nodes, nodes[1], 1)
			pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
			px.cut()
			testutil.WaitFor(t, waitCond, func() error {
				if st, _ := linkState(nodes[0], "n1"); st != "connecting" {
					return fmt.Errorf("n0's link to n1 %q, want connecting", st)
				}
				return nil
			})
			if tc.reason == "peer_restarted" {
				// n0 keeps seeing n1 alive through the restart, as when a
				// process restarts faster than failure detection.
				alive := func(ms []cluster.Member) []cluster.Member {
					for i := range ms {
						if ms[i].Name == "n1" {
							ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, px.addr()
						}
					}
					return ms
				}
				nodes[0].SetTestMembers(alive)
			}
			for i := range 5 {
				pub.Pub(t, "l/t", 1, false, strconv.Itoa(i))
			}
			pub.Pub(t, "l/t", 0, false, "qos0")
			if tc.name == "failed too long" {
				// n1 stays up but unreachable, marked failed, past the hold.
				markFailed(nodes[0], "n1")
				waitDropped(t, nodes[0], tc.reason, [3]int64{1, 5, 0})
				nodes[0].SetTestMembers(nil)
				return
			}
			gossip := nodes[1].GossipAddr()
			ctx := testutil.Context(t, waitCond)
			if err := nodes[1].Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			if tc.reason == "peer_restarted" {
				// Restarted as it would be: same name, same gossip address.
				n1 := startClusterNode(t, "n1", nodes[0].GossipAddr(), func(_ *config.Broker, c *config.Cluster) {
					c.GossipAddr, c.LinkAdvertise = gossip, px.addr()
				})
				px.setTarget(n1.Stats().Cluster.Link)
				testutil.WaitFor(t, waitCond, func() error {
					if st, _ := linkState(nodes[0], "n1"); st != "up" {
						return fmt.Errorf("n0's link to the new n1 %q, want up", st)
					}
					return nil
				})
				nodes[0].SetTestMembers(nil)
			}
			waitDropped(t, nodes[0], tc.reason, [3]int64{1, 5, 0})
		})
	}
}

// TestClusterLinkResetCounted: a QoS 0 message written on a link
// connection that breaks before the peer delivers it is not sent again
// (at most once), and is counted as "link_reset"; QoS 1 messages on the
// same connection are resent. Before the fix it was lost uncounted.
func TestClusterLinkResetCounted(t *testing.T) {
	nodes, px := proxiedPair(t, nil)
	far := testutil.MustV5(t, nodes[1].Addr(broker.ListenerTCP), "far")
	far.Sub(t, "z/#", 1)
	waitRoutes(t, nodes, nodes[1], 1)
	pub := testutil.MustV5(t, nodes[0].Addr(broker.ListenerTCP), "pub")
	written := func() int64 {
		for _, l := range nodes[0].Stats().Cluster.Links {
			if l.Peer == "n1" {
				return l.Messages
			}
		}
		return -1
	}
	before := written()
	px.frozen.Store(true) // n0's frames to n1 vanish, the connection stays open
	pub.Pub(t, "z/0", 0, false, "lost")
	pub.Pub(t, "z/1", 1, false, "resent")
	testutil.WaitFor(t, waitCond, func() error {
		if w := written(); w != before+2 {
			return fmt.Errorf("n0 wrote %d messages to n1, want %d", w-before, 2)
		}
		return nil
	})
	px.cut()
	px.frozen.Store(false)
	px.setTarget(nodes[1].Stats().Cluster.Link)
	expectPayloads(t, far, "resent")
	waitDropped(t, nodes[0], "link_reset", [3]int64{1, 0, 0})
}

// TestDropOfflineQos0Counted: a message delivered at QoS 0 to a client
// that is not connected is lost, and counted as "offline" by the QoS it
// was published with, in /v1/stats and /metrics. Before the fix (mochi
// patch 26) it was lost without a count.
func TestDropOfflineQos0Counted(t *testing.T) {
	b, _ := startBroker(t, nil)
	expiry := uint32(300)
	sub, _, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: "away", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if err != nil {
		t.Fatal(err)
	}
	sub.Sub(t, "off/#", 0)
	if err := sub.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := b.Stats().Connections; n != 0 {
			return fmt.Errorf("%d connections, want 0", n)
		}
		return nil
	})
	pub := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "pub")
	pub.Pub(t, "off/a", 0, false, "a")
	pub.Pub(t, "off/b", 1, false, "b")
	waitDropped(t, b, "offline", [3]int64{1, 1, 0})

	resp, err := http.Get("http://" + b.Addr(broker.ListenerAdmin) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`rtm_broker_messages_dropped_total{qos="0",reason="offline"} 1`,
		`rtm_broker_messages_dropped_total{qos="1",reason="offline"} 1`,
		`rtm_broker_messages_dropped_total{qos="1",reason="link_queue_full"} 0`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// TestDropExpiredCounted: a message held for an offline session past its
// message expiry interval is lost, and counted as "expired"; QoS 1/2
// messages held by a session that expires are counted as
// "session_expired". Before the fix (mochi patch 27) neither was counted.
func TestDropExpiredCounted(t *testing.T) {
	b, _ := startBroker(t, nil)
	connect := func(id string, sessionExpiry uint32) *testutil.V5 {
		c, _, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: id, CleanStart: false,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: &sessionExpiry}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	keeps := connect("keeps", 300) // its session outlives the message
	keeps.Sub(t, "exp/keeps", 1)
	goes := connect("goes", 1) // its session expires with a message held
	goes.Sub(t, "exp/goes", 2)
	for _, c := range []*testutil.V5{keeps, goes} {
		if err := c.Disconnect(&paho.Disconnect{}); err != nil {
			t.Fatal(err)
		}
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := b.Stats().Connections; n != 0 {
			return fmt.Errorf("%d connections, want 0", n)
		}
		return nil
	})
	pub := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "pub")
	one := uint32(1)
	if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "exp/keeps", QoS: 1, Payload: []byte("short-lived"),
		Properties: &paho.PublishProperties{MessageExpiry: &one}}); err != nil {
		t.Fatal(err)
	}
	pub.Pub(t, "exp/goes", 2, false, "held")
	waitDropped(t, b, "expired", [3]int64{0, 1, 0})
	waitDropped(t, b, "session_expired", [3]int64{0, 0, 1})

	// The expired message is not delivered when its client returns.
	back := connect("keeps", 300)
	pub.Pub(t, "exp/keeps", 1, false, "later")
	expectPayloads(t, back, "later")
}
