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
	// Waits for n1's answer to its claim, which n1 dropped.
	older := dialAsync(t, n0, cp())
	time.Sleep(200 * time.Millisecond) // the older CONNECT is sent first
	newer, _ := dialV5(t, n0, cp())
	wantRefused(t, <-older)
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
	older := dialAsync(t, n0, cp())
	<-held
	time.Sleep(300 * time.Millisecond) // well past the link's latency
	newer, _ := dialV5(t, n1, cp())
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "t", QoS: 1})
	close(release)
	wantRefused(t, <-older)
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

type dialResult struct {
	ca  *paho.Connack
	err error
}

// dialAsync connects a client to b in the background; an accepted one is
// disconnected again at once.
func dialAsync(t *testing.T, b *broker.Broker, cp *paho.Connect) <-chan dialResult {
	out := make(chan dialResult, 1)
	go func() {
		c, ca, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), cp)
		if err == nil {
			_ = c.Disconnect(&paho.Disconnect{})
		}
		out <- dialResult{ca, err}
	}()
	return out
}

// wantRefused fails unless the older CONNECT was refused with 0x88
// Server unavailable (its client, if still there, retries).
func wantRefused(t *testing.T, r dialResult) {
	t.Helper()
	if r.err == nil || r.ca == nil || r.ca.ReasonCode != 0x88 {
		t.Fatalf("older CONNECT: err %v, CONNACK %+v; want refused with 0x88", r.err, r.ca)
	}
}

// TestConnectOrderIgnoresClockSkew: which of two CONNECTs of a client on
// two nodes is newer does not depend on the nodes' wall clocks. Before,
// the claim carried its CONNECT's start by the claimant's wall clock and
// the answering node compared it with its own wall-clock time of the live
// connection, with 100 ms of margin:
//   - with n1's clock 2 s ahead, a device whose live (half-open)
//     connection is on n1 and that reconnects to n0 within those 2 s was
//     refused (0x88) again and again;
//   - with n1's clock 2 s behind, an abandoned older CONNECT on n0 took
//     the newer live connection on n1 over (0x8E).
func TestConnectOrderIgnoresClockSkew(t *testing.T) {
	nodes := testcluster.Brokers(t, "n", 2, nil)
	n0, n1 := nodes[0], nodes[1]
	waitMesh(t, nodes...)
	cp := func(id string) *paho.Connect {
		return &paho.Connect{ClientID: id, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	}

	t.Run("newer CONNECT takes over an older connection on a node ahead", func(t *testing.T) {
		n1.SetTestWallClockSkew(2 * time.Second)
		defer n1.SetTestWallClockSkew(0)
		old, _ := dialV5(t, n1, cp("dev-ahead"))
		subscribe(t, old, 0, paho.SubscribeOptions{Topic: "t/ahead", QoS: 1})
		// The device's connection to n1 is half-open; it connects to n0.
		c, ca, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), cp("dev-ahead"))
		if err != nil {
			t.Fatalf("newer CONNECT refused: err %v, CONNACK %+v", err, ca)
		}
		defer c.Disconnect(&paho.Disconnect{})
		if !ca.SessionPresent {
			t.Fatal("newer CONNECT: session present 0, want the session moved from n1")
		}
		select {
		case d := <-old.Disconnects:
			if d.ReasonCode != 0x8E {
				t.Fatalf("older connection ended with 0x%02X, want 0x8E", d.ReasonCode)
			}
		case <-old.Done():
		case <-time.After(waitMsg):
			t.Fatal("older connection on n1 not ended")
		}
	})

	t.Run("older CONNECT refused against a newer connection on a node behind", func(t *testing.T) {
		n1.SetTestWallClockSkew(-2 * time.Second)
		defer n1.SetTestWallClockSkew(0)
		held, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		n0.SetTestBeforeClaims(func(id string) {
			if id == "dev-behind" {
				once.Do(func() {
					close(held)
					<-release
				})
			}
		})
		defer n0.SetTestBeforeClaims(nil)
		older := dialAsync(t, n0, cp("dev-behind"))
		<-held
		time.Sleep(300 * time.Millisecond) // the device gave up on it
		newer, _ := dialV5(t, n1, cp("dev-behind"))
		defer newer.Disconnect(&paho.Disconnect{})
		close(release)
		wantRefused(t, <-older)
		select {
		case d := <-newer.Disconnects:
			t.Fatalf("the newer connection was ended (reason 0x%02X) by the older CONNECT", d.ReasonCode)
		case <-newer.Done():
			t.Fatal("the newer connection was ended by the older CONNECT")
		default:
		}
	})
}
