package broker_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestNoWatcherDoneBeforeHandOverForwards (review rv13l11 of the merge
// 7805a4a): gossip alone declares n0 failed on n1 and n2; n1 adopts svc.
// A forward on n2 marked m held for n0 (its direct copy to n1 skips svc)
// and has not yet queued m on n0's link when n2's gossip sees n0 alive
// again: n2 hands its held link over (resendReached) and its word that it
// is done waits for that forward's re-send (heldHandedOver). But n2's
// adoption watcher, in the middle of a round begun while n0 was failed,
// calls releaseWhenAdopted: no held link, a sync after its point, and it
// says done at once, ahead of the forward's copy. n1, done itself, drops
// svc's mark and then skips the held copy: m lost, not counted. h13b10's
// check (no word while the peer is in the alive set) kept the watcher
// quiet here; the merge kept only hflk10's sync, which a peer back alive
// satisfies.
func TestNoWatcherDoneBeforeHandOverForwards(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	watcherPaused := make(chan struct{})
	var wpOnce sync.Once
	n2.SetTestAfterClaim(func(id string) {
		if id == a.other {
			wpOnce.Do(func() { close(watcherPaused) })
			<-a.hold
		}
	})

	// Failure of n0 in gossip only (the process goes on).
	markFailed(n1, "n0")
	markFailed(n2, "n0")
	waitHeld(t, n1, "n0")
	waitHeld(t, n2, "n0")
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of svc")
	}
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1 (the adopted session's)", got)
		}
		return nil
	})
	select {
	case <-watcherPaused: // n2's watcher is in its round for n0, which it saw failed
	case <-time.After(waitCond):
		t.Fatal("n2's watcher did not begin adopting other")
	}

	// A forward of m on n2 that queued its direct copy for n1 (marked held
	// for n0) and not yet its copy on n0's held link. Which peer it queues
	// first follows a map's order: publish until it is n1.
	var mu sync.Mutex
	calls := 0
	paused := make(chan struct{}, 1)
	forwarded := make(chan struct{}, 1) // both copies of a message queued
	resume := make(chan struct{})
	var resumeOnce sync.Once
	letGo := func() { resumeOnce.Do(func() { close(resume) }) }
	t.Cleanup(letGo)
	n2.SetTestForwardQueued(func(topic, peer string) {
		if topic != "t/0" {
			return
		}
		mu.Lock()
		calls++
		first := calls%2 == 1
		mu.Unlock()
		if first && peer == "n1" {
			paused <- struct{}{}
			<-resume
		}
		if !first {
			select {
			case forwarded <- struct{}{}:
			default:
			}
		}
	})
	t.Cleanup(func() { n2.SetTestForwardQueued(nil) })
	var m string
	var acked chan error
	for i := 0; m == "" && i < 20; i++ {
		payload := fmt.Sprintf("m%d", i)
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*waitCond)
			defer cancel()
			_, err := a.p.Publish(ctx, &paho.Publish{Topic: "t/0", QoS: 1, Payload: []byte(payload)})
			done <- err
		}()
		// Not paused: its PUBACK waits for n2's hand-over of its held
		// link for n0 (the copy there), later; the next one is published
		// once it was forwarded.
		select {
		case <-paused:
			m, acked = payload, done
		case <-forwarded:
		case err := <-done:
			t.Fatalf("%s: PUBACK (err %v) before the hand-over of its held copy", payload, err)
		}
	}
	if m == "" {
		t.Fatal("no forward queued for n1 first in 20 publishes")
	}

	// n0 is alive again in n2's gossip, then in n1's: each hands over its
	// held link; n1 (no forward in flight) says it is done.
	n2.SetTestMembers(nil)
	waitNotHeld(t, waitCond, n2, "n0")
	n1.SetTestMembers(nil)
	waitNotHeld(t, waitCond, n1, "n0")
	// n2's watcher goes on with its round for n0.
	a.letOtherGo()
	// Before the fix, n2's watcher said done at once and n1 dropped svc's
	// mark; with n2's word waiting for the forward (at most 6 s), the
	// mark stays.
	gone := false
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if n1.AdoptedMarks() == 0 {
			gone = true
			break
		}
	}
	letGo()
	if err := <-acked; err != nil {
		t.Fatalf("%s not acknowledged: %v", m, err)
	}
	s, ca := dialV5(t, n1, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the adoption")
	}
	for {
		select {
		case got := <-s.Messages:
			if string(got.Payload) == m {
				return
			}
		case <-time.After(waitMsg):
			t.Fatalf("svc never got %s (acknowledged; mark dropped before its held copy: %v): lost, not counted", m, gone)
		}
	}
}
