package testutil

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
)

// V5 is an MQTT 5 test client (paho.golang) whose received messages and
// server DISCONNECTs arrive on channels.
type V5 struct {
	*paho.Client
	Conn        net.Conn
	Messages    chan *paho.Publish
	Disconnects chan *paho.Disconnect
}

// DialV5 connects an MQTT 5 client to addr ("host:port") with cp and returns
// it with the CONNACK. A refused CONNECT returns the CONNACK and an error.
// The client is disconnected when the test ends.
func DialV5(t testing.TB, addr string, cp *paho.Connect) (*V5, *paho.Connack, error) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	return ConnectV5(t, conn, cp)
}

// ConnectV5 is DialV5 over an established connection (e.g. a WebSocket).
func ConnectV5(t testing.TB, conn net.Conn, cp *paho.Connect) (*V5, *paho.Connack, error) {
	t.Helper()
	c := &V5{Conn: conn, Messages: make(chan *paho.Publish, 100000), Disconnects: make(chan *paho.Disconnect, 4)}
	c.Client = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(r paho.PublishReceived) (bool, error) {
			c.Messages <- r.Packet
			return true, nil
		}},
		OnServerDisconnect: func(d *paho.Disconnect) { c.Disconnects <- d },
		OnClientError:      func(error) {},
	})
	if cp.KeepAlive == 0 {
		cp.KeepAlive = 30
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		_ = conn.Close()
		return nil, ca, err
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}); _ = conn.Close() })
	return c, ca, nil
}

// MustV5 is DialV5 that fails the test on error.
func MustV5(t testing.TB, addr, clientID string) *V5 {
	t.Helper()
	c, _, err := DialV5(t, addr, &paho.Connect{ClientID: clientID, CleanStart: true})
	if err != nil {
		t.Fatalf("v5 connect %s to %s: %v", clientID, addr, err)
	}
	return c
}

// Sub subscribes to filter at qos and fails the test unless granted.
func (c *V5) Sub(t testing.TB, filter string, qos byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: qos}}})
	if err != nil {
		t.Fatalf("subscribe %s: %v", filter, err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] != qos {
		t.Fatalf("subscribe %s at QoS %d: SUBACK reasons %v", filter, qos, sa.Reasons)
	}
}

// Pub publishes and, for QoS 1/2, waits for the acknowledgement.
func (c *V5) Pub(t testing.TB, topic string, qos byte, retain bool, payload string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: []byte(payload)}); err != nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
}

// Next returns the next message received, failing the test after timeout.
func (c *V5) Next(t testing.TB, timeout time.Duration) *paho.Publish {
	t.Helper()
	select {
	case m := <-c.Messages:
		return m
	case <-time.After(timeout):
		t.Fatalf("client %s: no message within %v", c.ClientID(), timeout)
		return nil
	}
}

// None fails the test if a message arrives within d. Asserting absence needs
// a window; d should be short.
func (c *V5) None(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case m := <-c.Messages:
		t.Fatalf("client %s: unexpected message on %s: %q", c.ClientID(), m.Topic, m.Payload)
	case <-time.After(d):
	}
}

// V3 is an MQTT 3.1.1 test client (paho.mqtt.golang).
type V3 struct {
	mqtt3.Client
	Messages chan mqtt3.Message
}

// DialV3 connects an MQTT 3.1.1 client; opts may adjust the options.
func DialV3(t testing.TB, addr, clientID string, opts func(*mqtt3.ClientOptions)) (*V3, error) {
	t.Helper()
	c := &V3{Messages: make(chan mqtt3.Message, 100000)}
	o := mqtt3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetCleanSession(true).
		SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) { c.Messages <- m }).SetOrderMatters(true)
	if opts != nil {
		opts(o)
	}
	c.Client = mqtt3.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("v3 connect %s: timeout", clientID)
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

// Wait waits for a token and fails the test on error or timeout.
func Wait(t testing.TB, tok mqtt3.Token) {
	t.Helper()
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatal("v3 operation timed out")
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("v3 operation: %v", err)
	}
}
