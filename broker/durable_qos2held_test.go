package broker_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// qos2Client is a bare MQTT 3.1.1 or 5 client over TCP, for a publisher
// whose exact packet IDs, DUP flags and answers the test controls.
type qos2Client struct {
	conn net.Conn
	r    *bufio.Reader
	v    byte
}

// dialQos2 connects id to addr with a persistent session (3.1.1: clean
// session false; 5: session expiry 600 s) and returns the client and its
// CONNACK's session present flag.
func dialQos2(t *testing.T, addr, id string, v byte) (*qos2Client, bool) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, waitMsg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := &qos2Client{conn: conn, r: bufio.NewReader(conn), v: v}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: v < 5, ClientIdentifier: id, Keepalive: 30}}
	if v < 5 {
		pk.Connect.Clean = false
	} else {
		pk.Properties = packets.Properties{SessionExpiryInterval: 600, SessionExpiryIntervalFlag: true}
	}
	c.write(t, pk)
	ca, err := c.next(waitMsg)
	if err != nil || ca.FixedHeader.Type != packets.Connack || ca.ReasonCode != 0 {
		t.Fatalf("connect %s: %v, %+v", id, err, ca.FixedHeader)
	}
	return c, ca.SessionPresent
}

func (c *qos2Client) write(t *testing.T, pk packets.Packet) {
	t.Helper()
	pk.ProtocolVersion = c.v
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(waitMsg))
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		t.Fatalf("write %s: %v", packets.PacketNames[pk.FixedHeader.Type], err)
	}
}

// next returns the next packet received, or the error that ended the
// connection (a timeout after d).
func (c *qos2Client) next(d time.Duration) (packets.Packet, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	var pk packets.Packet
	b0, err := c.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b0); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(c.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	pk.ProtocolVersion = c.v
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	}
	return pk, err
}

func (c *qos2Client) publish(t *testing.T, id uint16, topic, payload string, dup bool) {
	t.Helper()
	c.write(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2, Dup: dup},
		TopicName: topic, PacketID: id, Payload: []byte(payload)})
}

// TestQos2PubrecNotForMessageLostToPeerRestart (mochi patch 123): with
// durability, a QoS 2 message m1 is published on n0 for a persistent
// session on n1 while n0's link to n1 is down, so its PUBREC waits for
// n1. n1 restarts faster than n0's failure detection and its new process
// throws n0's queue away: the wait fails, and n0 closes the publisher's
// connection without the PUBREC (TestPubackNotForMessageLostToPeerRestart,
// for QoS 1). The publisher reconnects (persistent session) and sends m1
// again with DUP, as MQTT requires. Before the patch n0 found m1's packet
// ID in the session's inbound QoS 2 state and answered PUBREC at once (it
// even resent one right after the CONNACK, before the PUBLISH came), and
// did not publish it again: the publisher completed the exchange, and
// the session never got m1. Now the resent PUBLISH is published again,
// its PUBREC waits for n1 again, and the session gets m1, once.
func TestQos2PubrecNotForMessageLostToPeerRestart(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("mqtt-v%d", v), func(t *testing.T) { testQos2PubrecNotForLostMessage(t, v) })
	}
}

func testQos2PubrecNotForLostMessage(t *testing.T, v byte) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	waitMesh(t, n0, n1)

	exp := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	dev, _ := dialV5(t, n1, &paho.Connect{ClientID: "qdev", CleanStart: true, Properties: exp})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rq/#", QoS: 2})
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, "qdev", "n1")

	pub, _ := dialQos2(t, n0.Addr(broker.ListenerTCP), "qpub", v)

	// n0 keeps seeing n1 alive through the restart.
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" {
				ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, px.addr()
			}
		}
		return ms
	})
	defer n0.SetTestMembers(nil)
	px.cut()
	before := linkQueuedTotal(n0, "n1")
	pub.publish(t, 1, "rq/x", "m1", false)
	testutil.WaitFor(t, waitCond, func() error {
		if linkQueuedTotal(n0, "n1") == before {
			return fmt.Errorf("m1 not queued on n0's link to n1")
		}
		return nil
	})

	gossip := n1.GossipAddr()
	n1.KillCluster() // as a kill -9 would, for the cluster
	n1b := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n1b.Stats().Cluster.Link)

	// The wait fails: the connection closes without the PUBREC.
	if pk, err := pub.next(waitCond); err == nil {
		t.Fatalf("got %s for m1, whose forward was thrown away (want the connection closed without it)",
			packets.PacketNames[pk.FixedHeader.Type])
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the publisher's connection is still open; the wait did not fail")
	}
	waitRoutes(t, []*broker.Broker{n0, n1b}, n1b, 1)

	// The publisher reconnects and sends m1 again, as a client must.
	pub, present := dialQos2(t, n0.Addr(broker.ListenerTCP), "qpub", v)
	if !present {
		t.Fatal("the publisher's session is gone")
	}
	pub.publish(t, 1, "rq/x", "m1", true)
	// As a client: PUBREL on the first successful PUBREC, done at the
	// PUBCOMP; the PUBRECs seen are reported if m1 is then lost.
	var recs []string
	released := false
	for {
		pk, err := pub.next(waitCond)
		if err != nil {
			t.Fatalf("no PUBCOMP for the resent m1 (PUBRECs %v): %v", recs, err)
		}
		if pk.FixedHeader.Type == packets.Pubcomp && pk.PacketID == 1 {
			break
		}
		if pk.FixedHeader.Type != packets.Pubrec || pk.PacketID != 1 {
			t.Fatalf("got %s id %d", packets.PacketNames[pk.FixedHeader.Type], pk.PacketID)
		}
		recs = append(recs, fmt.Sprintf("0x%02x", pk.ReasonCode))
		if pk.ReasonCode < 0x80 && !released {
			released = true
			pub.write(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 1})
		}
	}
	t.Logf("PUBRECs for the resent m1: %v", recs)

	// The publisher was told m1 is owned: the session must get it, once.
	waitStoredOwner(t, st, "qdev", "n1")
	c, ca := dialV5(t, n1b, &paho.Connect{ClientID: "qdev", CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on the restarted n1")
	}
	select {
	case m := <-c.Messages:
		if string(m.Payload) != "m1" {
			t.Fatalf("got %q, want m1", m.Payload)
		}
	case <-time.After(waitMsg):
		t.Fatalf("m1 lost after its PUBREC (PUBRECs %v)", recs)
	}
	c.None(t, 300*time.Millisecond)
}
