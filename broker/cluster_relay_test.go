package broker_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// relayPair starts two nodes whose session moves are confirmed no sooner
// than the tests below hold them.
func relayPair(t *testing.T) (src, dst *broker.Broker) {
	t.Helper()
	long := func(_ *config.Broker, cc *config.Cluster) { cc.ClaimTimeout = 20 * time.Second }
	src = startClusterNode(t, "n0", "", long)
	dst = startClusterNode(t, "n1", src.GossipAddr(), long)
	waitMesh(t, src, dst)
	return src, dst
}

// holdDetached makes src, as the source of client id's move, wait right
// after detaching the session until open is called; detached is closed
// when it is there.
func holdDetached(t *testing.T, src *broker.Broker, id string) (detached chan struct{}, open func()) {
	detached, release := make(chan struct{}), make(chan struct{})
	var once, opened sync.Once
	src.SetTestMoveDetached(func(got string) {
		if got == id {
			once.Do(func() { close(detached) })
			<-release
		}
	})
	open = func() { opened.Do(func() { close(release) }) }
	t.Cleanup(func() {
		open()
		src.SetTestMoveDetached(nil)
	})
	return detached, open
}

// reconnectAsync connects client id to b with its session (moving it
// there) in the background.
func reconnectAsync(t *testing.T, b *broker.Broker, id string) <-chan *testutil.V5 {
	out := make(chan *testutil.V5, 1)
	go func() {
		c, ca, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: id, CleanStart: false,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
		if err != nil || !ca.SessionPresent {
			t.Errorf("reconnect %s to %s: %v (connack %+v)", id, b.Name(), err, ca)
			c = nil
		}
		out <- c
	}()
	return out
}

func waitChan[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitCond):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// A message published on the source of a move after the session was
// detached reaches the moved session, also when the destination routes
// the topic for another subscriber (its direct copy arrives there before
// the session does). Before the fix the relay was skipped then: lost
// after PUBACK.
func TestSessionMoveRelaysWhenDestinationRoutes(t *testing.T) {
	src, dst := relayPair(t)
	dev, _ := dialV5(t, src, &paho.Connect{ClientID: "rd-dev", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rd/t", QoS: 1})
	other, _ := dialV5(t, dst, &paho.Connect{ClientID: "rd-other", CleanStart: true})
	subscribe(t, other, 0, paho.SubscribeOptions{Topic: "rd/t", QoS: 1})
	waitRoutes(t, []*broker.Broker{src, dst}, src, 1)
	waitRoutes(t, []*broker.Broker{src, dst}, dst, 1)
	pub, _ := dialV5(t, src, &paho.Connect{ClientID: "rd-pub", CleanStart: true})

	detached, release := holdDetached(t, src, "rd-dev")
	moved := reconnectAsync(t, dst, "rd-dev")
	waitChan(t, detached, "the session detached")
	pub.Pub(t, "rd/t", 1, false, "during the move")
	release()
	c := waitChan(t, moved, "the session on n1")
	if c == nil {
		t.FailNow()
	}
	expectPayloads(t, c, "during the move")
	expectPayloads(t, other, "during the move")
}

// A local publish whose forwarding ran before the session's relay started
// and whose local delivery ran after the session was detached is relayed
// (from OnPublished). Before the fix the relay lookup ran only with the
// forwarding: lost after PUBACK.
func TestSessionMoveRelaysPublishRacingDetach(t *testing.T) {
	src, dst := relayPair(t)
	dev, _ := dialV5(t, src, &paho.Connect{ClientID: "rr-dev", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rr/t", QoS: 1})
	pub, _ := dialV5(t, src, &paho.Connect{ClientID: "rr-pub", CleanStart: true})

	forwarded, resume := make(chan struct{}), make(chan struct{})
	var once, resumed sync.Once
	src.SetTestAfterForward(func(topic string) {
		if topic == "rr/t" {
			once.Do(func() { close(forwarded) })
			<-resume
		}
	})
	t.Cleanup(func() {
		resumed.Do(func() { close(resume) })
		src.SetTestAfterForward(nil)
	})
	detached, release := holdDetached(t, src, "rr-dev")

	acked := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitCond)
		defer cancel()
		_, err := pub.Publish(ctx, &paho.Publish{Topic: "rr/t", QoS: 1, Payload: []byte("racing")})
		acked <- err
	}()
	waitChan(t, forwarded, "the publish forwarded")
	moved := reconnectAsync(t, dst, "rr-dev")
	waitChan(t, detached, "the session detached")
	resumed.Do(func() { close(resume) })
	if err := waitChan(t, acked, "the PUBACK"); err != nil {
		t.Fatal(err)
	}
	release()
	c := waitChan(t, moved, "the session on n1")
	if c == nil {
		t.FailNow()
	}
	expectPayloads(t, c, "racing")
}

// What a relay cannot hold any more before its move's end is counted.
// Before the fix the relay of a peer's message dropped it silently.
func TestSessionMoveRelayFullCounted(t *testing.T) {
	src, dst := relayPair(t)
	src.SetTestRelayKeep(2)
	dev, _ := dialV5(t, src, &paho.Connect{ClientID: "rf-dev", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rf/t", QoS: 1})
	waitRoutes(t, []*broker.Broker{src, dst}, src, 1)
	// A publisher on the destination: its messages reach the source over
	// the link (routes stay pinned there) and are relayed back.
	pub, _ := dialV5(t, dst, &paho.Connect{ClientID: "rf-pub", CleanStart: true})

	detached, release := holdDetached(t, src, "rf-dev")
	moved := reconnectAsync(t, dst, "rf-dev")
	waitChan(t, detached, "the session detached")
	for i := range 5 {
		pub.Pub(t, "rf/t", 1, false, fmt.Sprint("m", i))
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := src.Stats().DroppedByReason["move_relay_full"]["1"]; n != 3 {
			return fmt.Errorf("move_relay_full QoS 1: %d, want 3", n)
		}
		return nil
	})
	release()
	c := waitChan(t, moved, "the session on n1")
	if c == nil {
		t.FailNow()
	}
	expectPayloads(t, c, "m0", "m1")
}

// A local QoS 1 publish that the relay of a moving session cannot hold is
// not acknowledged (the publisher's connection closes without its PUBACK,
// and it publishes again): a drop after a PUBACK would break the promise.
func TestSessionMoveRelayFullRefusesLocalPublish(t *testing.T) {
	src, dst := relayPair(t)
	src.SetTestRelayKeep(1)
	dev, _ := dialV5(t, src, &paho.Connect{ClientID: "rl-dev", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rl/t", QoS: 1})
	waitRoutes(t, []*broker.Broker{src, dst}, src, 1)
	pub, _ := dialV5(t, src, &paho.Connect{ClientID: "rl-pub", CleanStart: true})

	detached, release := holdDetached(t, src, "rl-dev")
	moved := reconnectAsync(t, dst, "rl-dev")
	waitChan(t, detached, "the session detached")
	pub.Pub(t, "rl/t", 1, false, "m0") // held by the relay
	acked := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := pub.Publish(ctx, &paho.Publish{Topic: "rl/t", QoS: 1, Payload: []byte("m1")})
		acked <- err
	}()
	select {
	case <-pub.Done(): // closed without the PUBACK
	case err := <-acked:
		if err == nil {
			t.Error("m1 acknowledged although the relay could not hold it")
		}
	case <-time.After(3 * time.Second):
		t.Error("the publisher's connection still open 3 s after m1 could not be relayed")
	}
	release()
	c := waitChan(t, moved, "the session on n1")
	if c == nil {
		t.FailNow()
	}
	expectPayloads(t, c, "m0")
}

// The relay's bound is in bytes too: large messages reach it long before
// the message count does.
func TestSessionMoveRelayBytesBounded(t *testing.T) {
	src, dst := relayPair(t)
	src.SetTestRelayBytes(2500)
	dev, _ := dialV5(t, src, &paho.Connect{ClientID: "rb-dev", CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rb/t", QoS: 1})
	waitRoutes(t, []*broker.Broker{src, dst}, src, 1)
	pub, _ := dialV5(t, dst, &paho.Connect{ClientID: "rb-pub", CleanStart: true})

	detached, release := holdDetached(t, src, "rb-dev")
	moved := reconnectAsync(t, dst, "rb-dev")
	waitChan(t, detached, "the session detached")
	for i := range 5 {
		pub.Pub(t, "rb/t", 1, false, fmt.Sprintf("m%d%01023d", i, 0)) // 1 KiB each
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := src.Stats().DroppedByReason["move_relay_full"]["1"]; n != 3 {
			return fmt.Errorf("move_relay_full QoS 1: %d, want 3 (2 of 1 KiB fit in 2,500 bytes)", n)
		}
		return nil
	})
	release()
	if c := waitChan(t, moved, "the session on n1"); c == nil {
		t.FailNow()
	}
}
