package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestAdoptedSessionMoveAfterLocalTakeover: a session adopted from a
// failed node is claimed by a CONNECT on another node; its move waits for
// the held copies of the failed node (up to heldWaitMax), and meanwhile a
// CONNECT of the same client on the adopter takes the session over there.
// The move must carry the session as it is then, or fail (the claimant
// retries): before, it sent the subscriptions of the client object it
// found when the claim came, which the takeover had emptied, so the
// claimant got an empty session (session present = 0) and the
// subscription was gone (seen in TestNodeDeathSessionsAdopted, cmd/rtm).
func TestAdoptedSessionMoveAfterLocalTakeover(t *testing.T) {
	n1, n2, a, hold := adoptedAwaitingHeld(t)
	defer hold()
	svc := a.svc

	connect := func(b *broker.Broker) (*testutil.V5, *paho.Connack, error) {
		return testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: svc, CleanStart: false,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	}
	type result struct {
		c   *testutil.V5
		ca  *paho.Connack
		err error
	}
	there := make(chan result, 1)
	go func() {
		c, ca, err := connect(n2)
		there <- result{c, ca, err}
	}()
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.MovesOut(); n != 1 {
			return fmt.Errorf("%d moves out of n1, want svc's", n)
		}
		return nil
	})
	// While n1's move waits, the client connects to n1 too: the session
	// is taken over there.
	if c, ca, err := connect(n1); err == nil {
		if !ca.SessionPresent {
			t.Fatal("session present = 0 on the adopter")
		}
		defer c.Disconnect(&paho.Disconnect{})
	}
	r := <-there
	c := r.c
	if r.err != nil {
		// Refused (to retry): the session is whole somewhere, and the
		// retry finds it.
		var ca *paho.Connack
		testutil.WaitFor(t, waitCond, func() error {
			var err error
			c, ca, err = connect(n2)
			return err
		})
		r.ca = ca
	}
	if !r.ca.SessionPresent {
		t.Fatal("session present = 0 on n2: the move carried an empty session")
	}
	defer c.Disconnect(&paho.Disconnect{})
	// Held for n0's sessions until n2 releases its held link (its
	// PUBACK waits for that hand-over).
	pubQueued(t, n2, a.p, "n0", "t/0", "after")
	hold()
	if m := c.Next(t, waitMsg); string(m.Payload) != "after" {
		t.Fatalf("got %q, want after", m.Payload)
	}
}

// adoptedAwaitingHeld sets up n0, n1, n2 with n0's session svc adopted by
// n1 after n0 died, and n2's held link for n0 not released (its adoption
// of other waits until hold is called): a move of svc from n1 waits up to
// heldWaitMax for n2's held copies.
func adoptedAwaitingHeld(t *testing.T) (n1, n2 *broker.Broker, a pausedAdoptions, hold func()) {
	t.Helper()
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 = testcluster.Broker(t, "n1", "", withStore)
	n2 = testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a = pauseAdoptions(t, st, nodes)
	hold = a.letOtherGo
	n0.KillCluster()
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		hold()
		t.Fatal("no adoption of the session")
	}
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1 (the adopted session's)", got)
		}
		return nil
	})
	return n1, n2, a, hold
}

// TestOlderClaimDuringHeldWaitDoesNotTakeOverNewer: the claim of a CONNECT
// on n2 reaches the adopter n1 while the session is offline there, and its
// move waits for the held copies; meanwhile the client connects to n1 (it
// gave up on n2: that CONNECT is older). The move must not end the newer,
// live connection: the claim is answered busy and the older CONNECT is
// refused. Before, the live connection was ended (0x8E) and the session
// moved to n2 (seen in TestNodeDeathSessionsAdopted under load: the
// device, whose older CONNECT nobody read any more, was left
// disconnected).
func TestOlderClaimDuringHeldWaitDoesNotTakeOverNewer(t *testing.T) {
	n1, n2, a, hold := adoptedAwaitingHeld(t)
	defer hold()
	cp := func() *paho.Connect {
		return &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	}
	older := dialAsync(t, n2, cp())
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.MovesOut(); n != 1 {
			return fmt.Errorf("%d moves out of n1, want svc's", n)
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond) // the newer CONNECT: well past the link's latency
	newer, ca := dialV5(t, n1, cp())
	if !ca.SessionPresent {
		t.Fatal("session present = 0 on the adopter")
	}
	wantRefused(t, <-older)
	select {
	case d := <-newer.Disconnects:
		t.Fatalf("the newer connection was ended (reason 0x%02X) by the older CONNECT's claim", d.ReasonCode)
	case <-newer.Done():
		t.Fatal("the newer connection was ended by the older CONNECT's claim")
	case <-time.After(time.Second):
	}
	// Held for n0's sessions until n2 releases its held link (its
	// PUBACK waits for that hand-over).
	pubQueued(t, n2, a.p, "n0", "t/0", "after")
	hold()
	if m := newer.Next(t, waitMsg); string(m.Payload) != "after" {
		t.Fatalf("got %q, want after", m.Payload)
	}
}
