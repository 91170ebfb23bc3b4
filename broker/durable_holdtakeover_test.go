package broker

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// A connection taken over whose PUBLISH reaches OnPublish only after the
// new connection's PUBLISH did (its goroutine was between the read and the
// hooks) replaces the new connection's slot: the new connection's PUBACK
// no longer waits for its write.
func TestDurableHoldTakenOverPublishKeepsNewSlot(t *testing.T) {
	d := holdHook(t, make(chan struct{}))
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	srv := mqtt.New(&mqtt.Options{})
	old := srv.NewClient(nil, "t", "pub", false)
	cur := &mqtt.Client{ID: "pub"}
	srv.Clients.Add(old)
	_, _ = d.OnPublish(old, pk) // old's earlier PUBLISH made its slot
	_ = d.OnPublishHold(old, pk)
	srv.DetachSession("pub") // taken over (as inheritClientSession marks it)
	if !old.IsTakenOver() {
		t.Fatal("not taken over")
	}
	_, _ = d.OnPublish(cur, pk) // new connection's PUBLISH starts
	_, _ = d.OnPublish(old, pk) // old connection's late PUBLISH
	tk, err := d.put(durOp{kind: opRetain})
	if err != nil {
		t.Fatal(err)
	}
	d.record(cur.ID, tk, nil, true) // cur's retained write
	if d.OnPublishHold(cur, pk) == nil {
		t.Fatal("the new connection's PUBLISH does not wait for its write (slot taken by the old connection)")
	}
}
