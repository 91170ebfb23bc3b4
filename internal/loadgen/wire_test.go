package loadgen

import (
	"bufio"
	"bytes"
	"testing"
)

// TestPublishRoundTrip: what appendPublish writes, readPacket and
// parsePublish read back, in both versions and every QoS.
func TestPublishRoundTrip(t *testing.T) {
	payload := bytes.Repeat([]byte{7}, 300) // a two-byte remaining length
	for _, v := range []byte{V311, V5} {
		for qos := byte(0); qos <= 2; qos++ {
			b := appendPublish(nil, v, qos, 513, "a/b", payload)
			pk, _, err := readPacket(bufio.NewReader(bytes.NewReader(b)), nil)
			if err != nil || pk.typ != typPublish {
				t.Fatalf("v%d qos %d: %v, type %d", v, qos, err, pk.typ)
			}
			topic, id, got, err := parsePublish(v, pk.flags, pk.body)
			wantID := uint16(513)
			if qos == 0 {
				wantID = 0
			}
			if err != nil || string(topic) != "a/b" || id != wantID || !bytes.Equal(got, payload) {
				t.Fatalf("v%d qos %d: topic %q id %d payload %d bytes, err %v", v, qos, topic, id, len(got), err)
			}
		}
	}
}

// TestConnackReceiveMaximum: the server's Receive Maximum is found among
// other MQTT 5 properties.
func TestConnackReceiveMaximum(t *testing.T) {
	// flags, reason, properties: assigned client ID "xy", topic alias max 10, receive max 20
	body := []byte{0, 0, 10, 0x12, 0, 2, 'x', 'y', 0x22, 0, 10, 0x21, 0, 20}
	body[2] = byte(len(body) - 3)
	ca, err := parseConnack(V5, body)
	if err != nil || ca.receiveMax != 20 || ca.reason != 0 {
		t.Fatalf("%+v %v", ca, err)
	}
}

// FuzzPackets: no input from a broker makes the decoders panic.
func FuzzPackets(f *testing.F) {
	f.Add(appendPublish(nil, V5, 1, 1, "t", []byte("p")))
	f.Add(appendPublish(nil, V311, 0, 0, "t", nil))
	f.Add([]byte{0x20, 3, 0, 0, 0})
	f.Add([]byte{0x90, 4, 0, 1, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		pk, _, err := readPacket(bufio.NewReader(bytes.NewReader(b)), nil)
		if err != nil {
			return
		}
		for _, v := range []byte{V311, V5} {
			_, _ = parseConnack(v, pk.body)
			_, _, _, _ = parsePublish(v, pk.flags, pk.body)
			_, _, _ = parseSuback(v, pk.body)
			_, _, _ = parseAck(pk.body)
		}
	})
}
