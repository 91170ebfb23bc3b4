// SPDX-License-Identifier: MIT
// rtm patch 78: canEncode reads a bit table, see PATCHES.md.

package packets

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCanEncodeMatchesValidPacketProperties pins what patch 78 must keep:
// for every property and packet type byte, canEncode answers what
// validPacketProperties says (v2.7.9 read the map itself).
func TestCanEncodeMatchesValidPacketProperties(t *testing.T) {
	var p Properties
	n := 0
	for k := 0; k < 256; k++ {
		for pkt := 0; pkt < 256; pkt++ {
			want := validPacketProperties[byte(k)][byte(pkt)] == 1
			require.Equal(t, want, p.canEncode(byte(pkt), byte(k)), "property %d, packet type %d", k, pkt)
			if want {
				n++
			}
		}
	}
	require.Greater(t, n, 60) // the table is not empty
	require.True(t, p.canEncode(WillProperties, PropWillDelayInterval))
	require.False(t, p.canEncode(Publish, PropWillDelayInterval))
	require.True(t, p.canEncode(Publish, PropUser))
}

// BenchmarkPublishEncodeV5 encodes an MQTT 5 PUBLISH with a topic alias
// and a user property, as a broker does for every subscriber.
func BenchmarkPublishEncodeV5(b *testing.B) {
	pk := Packet{
		FixedHeader:     FixedHeader{Type: Publish, Qos: 1},
		ProtocolVersion: 5,
		TopicName:       "a/b/c",
		PacketID:        7,
		Payload:         make([]byte, 64),
		Properties:      Properties{TopicAlias: 3, TopicAliasFlag: true, User: []UserProperty{{Key: "k", Val: "v"}}},
		Mods:            Mods{AllowResponseInfo: true},
	}
	var buf bytes.Buffer
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		buf.Reset()
		if err := pk.PublishEncode(&buf); err != nil {
			b.Fatal(err)
		}
	}
}
