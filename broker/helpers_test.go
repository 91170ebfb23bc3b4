package broker_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// Timeouts of the MQTT tests. They bound waits for things that should happen
// at once on loopback, so they are generous. No test waits out a window to
// assert that something does not arrive: it expects a later message instead
// (see expectNext).
const (
	waitMsg  = 5 * time.Second * raceScale  // a message that should arrive
	waitCond = 10 * time.Second * raceScale // a state the broker should reach
)

// msg is a received PUBLISH, whichever client library received it.
type msg struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
}

func (m msg) String() string {
	return fmt.Sprintf("%s q%d r=%t %q", m.topic, m.qos, m.retain, m.payload)
}

// client is what the protocol-matrix tests need from a v5 or v3.1.1 client.
type client interface {
	sub(t testing.TB, filter string, qos byte)
	pub(t testing.TB, topic string, qos byte, retain bool, payload []byte)
	next(t testing.TB) msg
	// within returns the next message, or false if none comes within d.
	within(d time.Duration) (msg, bool)
}

// v5 adapts testutil.V5 (paho.golang) to client.
type v5 struct{ *testutil.V5 }

func (c v5) sub(t testing.TB, filter string, qos byte) { t.Helper(); c.Sub(t, filter, qos) }

func (c v5) pub(t testing.TB, topic string, qos byte, retain bool, payload []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
	defer cancel()
	resp, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: payload})
	if err != nil {
		t.Fatalf("v5 publish %s q%d: %v", topic, qos, err)
	}
	if qos > 0 && resp.ReasonCode >= 0x80 {
		t.Fatalf("v5 publish %s q%d: reason 0x%02X", topic, qos, resp.ReasonCode)
	}
}

func (c v5) next(t testing.TB) msg {
	t.Helper()
	m := c.Next(t, waitMsg)
	return msg{topic: m.Topic, payload: m.Payload, qos: m.QoS, retain: m.Retain}
}

func (c v5) within(d time.Duration) (msg, bool) {
	select {
	case m := <-c.Messages:
		return msg{topic: m.Topic, payload: m.Payload, qos: m.QoS, retain: m.Retain}, true
	case <-time.After(d):
		return msg{}, false
	}
}

// v3 adapts testutil.V3 (paho.mqtt.golang) to client.
type v3 struct{ *testutil.V3 }

func (c v3) sub(t testing.TB, filter string, qos byte) {
	t.Helper()
	tok := c.Subscribe(filter, qos, nil)
	testutil.Wait(t, tok)
	if got := tok.(*mqtt3.SubscribeToken).Result()[filter]; got != qos {
		t.Fatalf("v3 subscribe %s at QoS %d: granted %d", filter, qos, got)
	}
}

func (c v3) pub(t testing.TB, topic string, qos byte, retain bool, payload []byte) {
	t.Helper()
	testutil.Wait(t, c.Publish(topic, qos, retain, payload))
}

func (c v3) next(t testing.TB) msg {
	t.Helper()
	m, ok := c.within(waitMsg)
	if !ok {
		t.Fatalf("v3 client: no message within %v", waitMsg)
	}
	return m
}

func (c v3) within(d time.Duration) (msg, bool) {
	select {
	case m := <-c.Messages:
		return msg{topic: m.Topic(), payload: m.Payload(), qos: m.Qos(), retain: m.Retained()}, true
	case <-time.After(d):
		return msg{}, false
	}
}

// newClient connects a clean-session client of protocol "v5" or "v3".
func newClient(t testing.TB, proto, addr, id string) client {
	t.Helper()
	switch proto {
	case "v5":
		return v5{testutil.MustV5(t, addr, id)}
	case "v3":
		c, err := testutil.DialV3(t, addr, id, nil)
		if err != nil {
			t.Fatalf("v3 connect %s: %v", id, err)
		}
		return v3{c}
	}
	t.Fatalf("unknown protocol %q", proto)
	return nil
}

// expectNext fails unless the next message c receives is on topic with
// payload; expecting a sentinel published after a message that must not
// arrive proves its absence without a waiting window, since the broker
// handles one connection's packets in order.
func expectNext(t testing.TB, c client, topic string, payload []byte) msg {
	t.Helper()
	m := c.next(t)
	if m.topic != topic || string(m.payload) != string(payload) {
		t.Fatalf("received %v, want %s %q", m, topic, payload)
	}
	return m
}

// dialV3 connects a v3.1.1 client like testutil.DialV3 but returns the
// CONNACK's session present flag and return code, also on refusal.
func dialV3(t testing.TB, url, id string, opts func(*mqtt3.ClientOptions)) (c *testutil.V3, present bool, code byte, err error) {
	t.Helper()
	c = &testutil.V3{Messages: make(chan mqtt3.Message, 10000)}
	o := mqtt3.NewClientOptions().AddBroker(url).SetClientID(id).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(waitMsg).SetCleanSession(true).
		SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) { c.Messages <- m }).SetOrderMatters(true)
	if opts != nil {
		opts(o)
	}
	c.Client = mqtt3.NewClient(o)
	tok := c.Connect().(*mqtt3.ConnectToken)
	if !tok.WaitTimeout(2 * waitMsg) {
		return nil, false, 0, fmt.Errorf("v3 connect %s: timeout", id)
	}
	if err := tok.Error(); err != nil {
		return nil, false, tok.ReturnCode(), err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, tok.SessionPresent(), tok.ReturnCode(), nil
}

// raw is a bare MQTT 5 client that writes and reads packets one by one, for
// what a client library refuses to send or hides (oversized packets, exact
// CONNACK properties, a subscriber that stops reading).
type raw struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *raw {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, waitMsg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &raw{Conn: conn, r: bufio.NewReader(conn)}
}

func (c *raw) send(t testing.TB, p io.WriterTo) {
	t.Helper()
	_ = c.SetWriteDeadline(time.Now().Add(waitMsg))
	if _, err := p.WriteTo(c.Conn); err != nil {
		t.Fatalf("raw write %T: %v", p, err)
	}
}

// read returns the next packet, or the error that ended the connection.
func (c *raw) read(timeout time.Duration) (*packets.ControlPacket, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	return packets.ReadPacket(c.r)
}

// connect sends cp (protocol 5 if unset) and returns the CONNACK.
func (c *raw) connect(t testing.TB, cp *packets.Connect) *packets.Connack {
	t.Helper()
	if cp.ProtocolName == "" {
		cp.ProtocolName, cp.ProtocolVersion = "MQTT", 5
	}
	if cp.Properties == nil {
		cp.Properties = &packets.Properties{}
	}
	c.send(t, cp)
	p, err := c.read(waitMsg)
	if err != nil {
		t.Fatalf("raw connect %s: reading CONNACK: %v", cp.ClientID, err)
	}
	ca, ok := p.Content.(*packets.Connack)
	if !ok {
		t.Fatalf("raw connect %s: got %s, want CONNACK", cp.ClientID, p.PacketType())
	}
	return ca
}

// expectClosed reads until the broker closes the connection and returns the
// packets received before that.
func (c *raw) expectClosed(t testing.TB) []*packets.ControlPacket {
	t.Helper()
	var got []*packets.ControlPacket
	for {
		p, err := c.read(waitCond)
		if err == nil {
			got = append(got, p)
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection still open after %v (received %d packets)", waitCond, len(got))
		}
		return got // EOF or reset: closed by the broker
	}
}

// waitConnections polls until the broker counts want connected clients.
func waitConnections(t testing.TB, b *broker.Broker, want int64) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		if got := b.Stats().Connections; got != want {
			return fmt.Errorf("connections = %d, want %d", got, want)
		}
		return nil
	})
}
