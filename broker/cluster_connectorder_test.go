package broker_test

import (
	"context"
	"sync"
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

// TestOlderConnectOnAnotherNodeDoesNotTakeOverNewer: as
// TestOlderConnectDoesNotTakeOverNewer, with the newer connection on
// another node: the older CONNECT, held before its claims, claims the
// client when the newer connection is live. Its claim is answered busy
// and it is refused; before, the live connection was ended (0x8E) and its
// session moved to the older CONNECT, for a socket nobody reads (seen in
// TestNodeDeathSessionsAdopted: a device left disconnected, the messages
// published after that missing).
func TestOlderConnectOnAnotherNodeDoesNotTakeOverNewer(t *testing.T) {
	nodes := testcluster.Brokers(t, "n", 2, nil)
	n0, n1 := nodes[0], nodes[1]
	waitMesh(t, nodes...)
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	n0.SetTestBeforeClaims(func(id string) {
		if id == "dev" {
			once.Do(func() {
				close(held)
				<-release
			})
		}
	})
	defer n0.SetTestBeforeClaims(nil)

	cp := func() *paho.Connect {
		return &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	}
	older := make(chan error, 1)
	go func() {
		c, _, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), cp())
		if err == nil {
			defer c.Disconnect(&paho.Disconnect{})
		}
		older <- err
	}()
	<-held
	time.Sleep(300 * time.Millisecond) // well past claimSkew
	newer, _ := dialV5(t, n1, cp())
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "t", QoS: 1})
	close(release)
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := newer.Publish(ctx, &paho.Publish{Topic: "t", QoS: 1, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if m := newer.Next(t, waitMsg); string(m.Payload) != "x" {
		t.Fatalf("got %q", m.Payload)
	}
}
