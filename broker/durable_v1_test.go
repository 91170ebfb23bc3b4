package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHeldCopyNotToV1PeerThatAdoptedNothing: during a rolling upgrade a
// node of the previous release (protocol version 1) cannot tell a held copy
// from the direct copy its subscribers had, so a held link's copies are
// not re-sent to it unless it adopted sessions of the dead node. (Before:
// its plain subscriber got a message published during the failover twice.)
func TestHeldCopyNotToV1PeerThatAdoptedNothing(t *testing.T) {
	nodes, st := durableCluster(t, 3)
	n0, n1, n2 := nodes[0], nodes[1], nodes[2]
	n2.SpeakProtocolV1()
	testutil.WaitFor(t, waitCond, func() error {
		if v := n1.PeerProtocol("n2"); v != 1 {
			return fmt.Errorf("n1 speaks version %d to n2, want 1", v)
		}
		return nil
	})
	svc := ""
	for i := 0; svc == ""; i++ {
		if id := fmt.Sprintf("svc-%d", i); broker.Adopter(id, "n1", "n2") == "n1" {
			svc = id
		}
	}
	expiry := ptr(uint32(600))
	c, _ := dialV5(t, n0, &paho.Connect{ClientID: svc, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "t/x", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	waitConnections(t, n0, 0)
	waitStoredOwner(t, st, svc, "n0")
	x, _ := dialV5(t, n2, &paho.Connect{ClientID: "x", CleanStart: true})
	subscribe(t, x, 0, paho.SubscribeOptions{Topic: "t/x", QoS: 1})
	waitRoutes(t, nodes, n2, 1)
	waitRoutes(t, nodes, n0, 1)
	p, _ := dialV5(t, n1, &paho.Connect{ClientID: "p", CleanStart: true})

	// The adoption pauses after its claim, so m1 is published while n0's
	// held link on n1 takes it too.
	var once sync.Once
	blocked, release := make(chan struct{}), make(chan struct{})
	for _, n := range nodes[1:] {
		n.SetTestAfterClaim(func(id string) {
			if id == svc {
				once.Do(func() { close(blocked) })
				<-release
			}
		})
		defer n.SetTestAfterClaim(nil)
	}
	n0.KillCluster()
	select {
	case <-blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of the session")
	}
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n1, p, "n0", "t/x", "m1")
	close(release)
	waitStoredOwner(t, st, svc, "n1")
	// The adopted session gets the held copy: the release re-sent it (to
	// the peers first, then here).
	s, ca := dialV5(t, n1, &paho.Connect{ClientID: svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the adoption")
	}
	if m := s.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("adopted session got %q, want m1", m.Payload)
	}
	// m2 follows on the same link whatever the release sent n2.
	p.Pub(t, "t/x", 1, false, "m2")
	for _, want := range []string{"m1", "m2"} {
		if m := x.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("x, a plain subscriber on the version 1 node, got %q, want %s (m1 once, then m2)", m.Payload, want)
		}
	}
}
