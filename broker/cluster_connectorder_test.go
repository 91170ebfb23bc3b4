package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestOlderConnectDoesNotTakeOverNewer: a CONNECT waits in the session
// hooks (here for a peer that does not answer its claim, up to
// cluster.claim_timeout; in TestNodeDeathSessionsAdopted for an adoption
// slowed by the store), its client gives up and connects again, and the
// new connection is established first. The older CONNECT, completing
// last, must not take the session over from the live connection: before,
// it did (DISCONNECT 0x8E to the live connection, for a socket nobody
// reads), and the device was left disconnected with its messages queued.
func TestOlderConnectDoesNotTakeOverNewer(t *testing.T) {
	nodes := testcluster.Brokers(t, "n", 2, nil)
	n0, n1 := nodes[0], nodes[1]
	waitMesh(t, nodes...)
	n1.DropClaims(1)

	cp := func() *paho.Connect {
		return &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	}
	older := make(chan error, 1)
	go func() {
		// Waits for n1's answer to its claim, which n1 dropped.
		c, _, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), cp())
		if err == nil {
			defer c.Disconnect(&paho.Disconnect{})
		}
		older <- err
	}()
	time.Sleep(200 * time.Millisecond) // the older CONNECT is sent first
	newer, _ := dialV5(t, n0, cp())
	if err := <-older; err == nil {
		t.Log("the older CONNECT was accepted")
	}
	select {
	case d := <-newer.Disconnects:
		t.Fatalf("the newer connection was ended (reason 0x%02X) by the older CONNECT", d.ReasonCode)
	case <-newer.Done():
		t.Fatal("the newer connection was ended by the older CONNECT")
	case <-time.After(time.Second):
	}
	// Still the live one: it publishes and receives.
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "t", QoS: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := newer.Publish(ctx, &paho.Publish{Topic: "t", QoS: 1, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if m := newer.Next(t, waitMsg); string(m.Payload) != "x" {
		t.Fatalf("got %q", m.Payload)
	}
}
