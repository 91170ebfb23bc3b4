package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestWillOnAdopterReachesAdoptedSessionOnce: a will published on the node
// adopting a dead node's sessions, while that node's held link still holds
// (the adoption is under way), reaches a session already adopted once,
// through the held copy re-sent at the release. Before, mochi delivered the
// will here first and the cluster forwarded it only afterwards
// (OnWillSent), so the local delivery did not leave the adopted session out
// (Packet.Exclude) while the held link took the will too: the session got
// it twice, the direct copy ahead of older held messages (review finding).
func TestWillOnAdopterReachesAdoptedSessionOnce(t *testing.T) {
	nodes, st := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1] // n1, the only survivor, adopts every session
	expiry := ptr(uint32(600))
	var ids []string
	for i := range 4 {
		id := fmt.Sprintf("wf-dev%d", i)
		ids = append(ids, id)
		c, _ := dialV5(t, n0, &paho.Connect{ClientID: id, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: "wf/#", QoS: 1})
		_ = c.Disconnect(&paho.Disconnect{})
	}
	waitConnections(t, n0, 0)
	for _, id := range ids {
		waitStoredOwner(t, st, id, "n0")
	}
	waitRoutes(t, nodes, n0, 1)

	// obs, a session of n1's own, shows when the will was delivered there.
	obs, _ := dialV5(t, n1, &paho.Connect{ClientID: "wf-obs", CleanStart: true})
	subscribe(t, obs, 0, paho.SubscribeOptions{Topic: "wf/#", QoS: 1})
	w, _ := dialV5(t, n1, &paho.Connect{ClientID: "wf-will", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "wf/will", QoS: 1, Payload: []byte("gone")}})

	// The adoption stops at its second session: the first is installed
	// (restore installs each right after its claim) and marked adopted
	// from n0, and n0's held link is not released yet.
	var mu sync.Mutex
	first, n := "", 0
	paused := make(chan struct{})
	release := make(chan struct{})
	n1.SetTestAfterClaim(func(id string) {
		mu.Lock()
		n++
		if n == 1 {
			first = id
		}
		pause := n == 2
		mu.Unlock()
		if pause {
			close(paused)
			<-release
		}
	})
	defer n1.SetTestAfterClaim(nil)
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	n0.KillCluster()
	select {
	case <-paused:
	case <-time.After(waitCond):
		t.Fatal("n1 did not adopt n0's sessions")
	}

	forwarded := n1.Stats().Cluster.Forwarded
	_ = w.Conn.Close() // abruptly: the will fires on n1
	select {
	case m := <-obs.Messages:
		if m.Topic != "wf/will" {
			t.Fatalf("observer got %s, want the will", m.Topic)
		}
	case <-time.After(waitMsg):
		t.Fatal("the will was not published on n1")
	}
	// Forwarded, into n0's held link (n1's only peer).
	testutil.WaitFor(t, waitCond, func() error {
		if got := n1.Stats().Cluster.Forwarded; got == forwarded {
			return fmt.Errorf("will not forwarded yet")
		}
		return nil
	})
	released = true
	close(release)

	mu.Lock()
	id := first
	mu.Unlock()
	dev, ca := dialV5(t, n1, &paho.Connect{ClientID: id, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatalf("%s: session not present on its adopter", id)
	}
	// The held copy arrives once the release re-sent it; a second copy
	// would be close to it (ahead of it before the fix).
	got := 0
	wait := time.After(waitMsg)
	for done := false; !done; {
		select {
		case m := <-dev.Messages:
			if m.Topic == "wf/will" {
				got++
				wait = time.After(2 * time.Second)
			}
		case <-wait:
			done = true
		}
	}
	if got != 1 {
		t.Fatalf("the will reached the session adopted from the dead node %d times, want 1", got)
	}
}
