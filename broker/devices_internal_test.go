package broker

import (
	"io"
	"log/slog"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// TestTakeoverKeepsNewUnsubscribes: when a takeover's old connection ends
// after the new one left a push channel with UNSUBSCRIBE, the new
// connection's mark stays, so re-applying the recorded channels does not
// subscribe it again. (Before: the old connection's end cleared the marks
// of its client ID, the new one's included.)
func TestTakeoverKeepsNewUnsubscribes(t *testing.T) {
	b := &Broker{mq: mqtt.New(nil), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	h := newDevicesHook(b, nil)
	old := b.mq.NewClient(nil, "t", "dev", false)
	h.conns.Store(old, connRecord{id: "old"})
	nu := b.mq.NewClient(nil, "t", "dev", false)
	b.mq.Clients.Add(nu) // the takeover installed the new connection
	h.conns.Store(nu, connRecord{id: "new"})
	h.OnUnsubscribed(nu, packets.Packet{PacketID: 1, Filters: packets.Subscriptions{{Filter: "push/news"}}})
	h.OnDisconnect(old, nil, false)
	if _, ok := h.unsubscribed["dev"]["news"]; !ok {
		t.Fatal("the new connection's UNSUBSCRIBE of push/news was forgotten when the old connection ended")
	}
	h.OnDisconnect(nu, nil, false) // the session's own end clears them
	if len(h.unsubscribed["dev"]) != 0 {
		t.Fatal("marks kept after the connection that made them ended")
	}
}
