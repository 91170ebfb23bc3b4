package broker_test

import (
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// TestHealAnswerAgesAtSend: n1 answers the deciding node n0's owners list
// while its own gossip still has n0 failed, so the answer waits for a
// link to n0 (asymmetric views at a heal). Its session of x is older than
// n0's by less than that wait. The ages in the answer must be measured
// when it goes out: before, they were measured when n1 judged n0's list,
// so after the wait n1's session looked newer than n0's by the wait, and
// n0 ended its own, newer session (and then n1's stale one stayed, or
// was ended too by n0's other verdict: no session left).
func TestHealAnswerAgesAtSend(t *testing.T) {
	n0, n1, old := healPair(t)
	markFailed(n0, "n1")
	markFailed(n1, "n0")
	waitNoLinks(t, n0, n1)
	newer, _ := dialV5(t, n0, &paho.Connect{ClientID: "x", CleanStart: false, Properties: healExpiry()})
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

	judged := make(chan struct{}, 16)
	n1.SetTestOwnersHandled(func(from string) {
		if from == "n0" {
			judged <- struct{}{}
		}
	})
	defer n1.SetTestOwnersHandled(nil)
	n0.SetTestMembers(nil) // n0's link reaches n1, with n0's list; n1 still has n0 failed
	select {
	case <-judged:
	case <-time.After(waitCond):
		t.Fatal("n1 got no owners list from n0")
	}
	// n1's gossip sees n0 alive again 3 s later (more than the gap
	// between the two sessions): its answer goes out then.
	time.Sleep(3 * time.Second)
	n1.SetTestMembers(nil)
	waitOneOwner(t, n1, n0, old, newer)
}
