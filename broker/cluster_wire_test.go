package broker

import (
	"reflect"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

func samplePacket(qos byte) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: true},
		TopicName:   "a/b", Payload: []byte("payload"), PacketID: 9,
		Properties: packets.Properties{ContentType: "text/plain", ResponseTopic: "r", CorrelationData: []byte{1},
			User: []packets.UserProperty{{Key: "k", Val: "v"}}},
	}
}

// clusterSeeds are valid messages of every type, the fuzzer's start.
func clusterSeeds(t testing.TB) map[byte][]byte {
	must := func(b []byte, err error) []byte {
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return map[byte][]byte{
		msgRoutes:     routesMsg{Version: 3, Filters: []string{"a/+", "$share/g/b/#"}}.encode(),
		msgRouteDelta: routeDeltaMsg{Version: 4, Added: true, Filter: "x/#"}.encode(),
		msgPublish:    must(publishMsg{Origin: "c1", Expiry: 30, Shared: []string{"$share/g/a/b"}, Packet: samplePacket(1)}.encode()),
		msgRetained:   must(retainedMsg{Stamp: 77, Node: "n1", Expiry: 5, Packet: samplePacket(0)}.encode()),
		msgClaim:      claimMsg{ID: 5, ClientID: "dev", Clean: true}.encode(),
		msgClaimReply: must(claimReplyMsg{ID: 5, ClientID: "dev", Found: true, Session: mqtt.Session{
			Subscriptions: []packets.Subscription{{Filter: "a/#", Qos: 1, NoLocal: true, Identifier: 4}},
			Inflight:      []packets.Packet{samplePacket(1)}, Expiry: 60, ExpirySet: true}}.encode()),
	}
}

func decodeAny(typ byte, b []byte) (any, error) {
	switch typ % 6 {
	case 0:
		return decodeRoutes(b)
	case 1:
		return decodeRouteDelta(b)
	case 2:
		return decodePublish(b)
	case 3:
		return decodeRetained(b)
	case 4:
		return decodeClaim(b)
	default:
		return decodeClaimReply(b)
	}
}

func TestClusterMessagesRoundTrip(t *testing.T) {
	for typ, b := range clusterSeeds(t) {
		m, err := decodeAny(typ-msgRoutes, b)
		if err != nil {
			t.Fatalf("type %d: %v", typ, err)
		}
		switch m := m.(type) {
		case publishMsg:
			p := m.Packet
			if m.Origin != "c1" || m.Expiry != 30 || p.TopicName != "a/b" || string(p.Payload) != "payload" || p.FixedHeader.Qos != 1 ||
				!p.FixedHeader.Retain || p.Properties.ContentType != "text/plain" || len(p.Properties.User) != 1 || m.Shared[0] != "$share/g/a/b" {
				t.Errorf("publish round trip: %+v", m)
			}
		case claimReplyMsg:
			s := m.Session
			if !m.Found || m.ClientID != "dev" || !s.ExpirySet || s.Expiry != 60 || len(s.Inflight) != 1 || s.Inflight[0].PacketID != 9 ||
				!reflect.DeepEqual(s.Subscriptions, []packets.Subscription{{Filter: "a/#", Qos: 1, NoLocal: true, Identifier: 4}}) {
				t.Errorf("claim reply round trip: %+v", m)
			}
		}
		// Every truncation is an error, never a panic.
		for i := range len(b) {
			if _, err := decodeAny(typ-msgRoutes, b[:i]); err == nil {
				t.Errorf("type %d truncated to %d of %d bytes: no error", typ, i, len(b))
			}
		}
	}
}

// FuzzClusterMessage feeds arbitrary bytes to the decoders of every message
// a peer can send: none may panic or allocate beyond the input.
func FuzzClusterMessage(f *testing.F) {
	for typ, b := range clusterSeeds(f) {
		f.Add(typ-msgRoutes, b)
	}
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		_, _ = decodeAny(typ, b)
	})
}
