package broker_test

import (
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
)

// TestIdleConnectionsParkedByDefault: with the default settings an idle
// MQTT connection gives up its goroutine (mochi patch 86) and still gets
// what is published to it, and what it publishes is delivered.
func TestIdleConnectionsParkedByDefault(t *testing.T) {
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	sub := newClient(t, "v3", addr, "parked-sub")
	sub.sub(t, "parked/#", 1)
	pub := newClient(t, "v5", addr, "parked-pub")
	deadline := time.Now().Add(30 * time.Second)
	for b.Stats().Parked < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("idle connections not parked (rtm_broker_connections_parked): %d of 2", b.Stats().Parked)
		}
		time.Sleep(50 * time.Millisecond)
	}
	pub.pub(t, "parked/a", 1, false, []byte("one"))
	expectNext(t, sub, "parked/a", []byte("one"))
}
