// SPDX-License-Identifier: MIT
// rtm patch: decoder fuzz test, see PATCHES.md and
// https://github.com/mochi-mqtt/server/issues/501

package packets

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

// decodeLikeServer mirrors what mqtt.Client.ReadFixedHeader and
// mqtt.Client.ReadPacket do with the bytes a client sends: decode the fixed
// header byte, the remaining length, read exactly Remaining bytes, then run the
// decoder of the packet type, followed by the validation the server runs on
// the decoded packet (see Server.processPacket and Server.validateConnect).
// It must never panic, whatever the input.
func decodeLikeServer(r io.ByteReader, body func(n int) ([]byte, bool), version byte) error {
	hb, err := r.ReadByte()
	if err != nil {
		return err
	}

	fh := new(FixedHeader)
	if err := fh.Decode(hb); err != nil {
		return err
	}

	fh.Remaining, _, err = DecodeLength(r)
	if err != nil {
		return err
	}

	px, ok := body(fh.Remaining)
	if !ok {
		return io.ErrUnexpectedEOF // the server would block in io.ReadFull, then fail
	}

	pk := Packet{ProtocolVersion: version, FixedHeader: *fh}
	switch pk.FixedHeader.Type {
	case Connect:
		err = pk.ConnectDecode(px)
		if err == nil {
			_ = pk.ConnectValidate()
		}
	case Disconnect:
		err = pk.DisconnectDecode(px)
	case Connack:
		err = pk.ConnackDecode(px)
	case Publish:
		err = pk.PublishDecode(px)
		if err == nil {
			_ = pk.PublishValidate(65535)
			_ = pk.Copy(false)
		}
	case Puback:
		err = pk.PubackDecode(px)
	case Pubrec:
		err = pk.PubrecDecode(px)
		if err == nil {
			_ = pk.ReasonCodeValid()
		}
	case Pubrel:
		err = pk.PubrelDecode(px)
	case Pubcomp:
		err = pk.PubcompDecode(px)
	case Subscribe:
		err = pk.SubscribeDecode(px)
		if err == nil {
			_ = pk.SubscribeValidate()
		}
	case Suback:
		err = pk.SubackDecode(px)
	case Unsubscribe:
		err = pk.UnsubscribeDecode(px)
		if err == nil {
			_ = pk.UnsubscribeValidate()
		}
	case Unsuback:
		err = pk.UnsubackDecode(px)
	case Pingreq:
		err = pk.PingreqDecode(px)
	case Pingresp:
		err = pk.PingrespDecode(px)
	case Auth:
		err = pk.AuthDecode(px)
		if err == nil {
			_ = pk.AuthValidate()
		}
	default:
		err = fmt.Errorf("invalid packet type; %v", pk.FixedHeader.Type)
	}

	return err
}

// decodeStream decodes data as it would arrive on a connection: fixed header,
// variable length, then the body (only if all Remaining bytes are present).
func decodeStream(data []byte, version byte) error {
	r := bytes.NewReader(data)
	return decodeLikeServer(r, func(n int) ([]byte, bool) {
		if n > r.Len() {
			return nil, false
		}
		p := make([]byte, n)
		_, _ = io.ReadFull(r, p)
		return p, true
	}, version)
}

// decodeFramed treats data[0] as the fixed header byte and the rest as a body
// of exactly that length: what the server sees once the length prefix agreed
// with the number of bytes sent. This lets the fuzzer mutate bodies freely
// without also having to keep the length prefix consistent.
func decodeFramed(data []byte, version byte) error {
	if len(data) == 0 {
		return nil
	}
	var hdr bytes.Buffer
	hdr.WriteByte(data[0])
	encodeLength(&hdr, int64(len(data)-1))
	hdr.Write(data[1:])
	return decodeStream(hdr.Bytes(), version)
}

// fuzzVersions are the protocol versions a client can have negotiated when it
// sends a packet (the server decodes with the connection's version).
var fuzzVersions = []byte{3, 4, 5}

func checkNoPanic(t *testing.T, data []byte) {
	t.Helper()
	for _, v := range fuzzVersions {
		for mode, fn := range map[string]func([]byte, byte) error{
			"stream": decodeStream,
			"framed": decodeFramed,
		} {
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("decoder panicked (mode %s, protocol version %d) on % x: %v", mode, v, data, r)
					}
				}()
				_ = fn(data, v)
			}()
		}
	}
}

// truncations returns raw with its body cut at every length, the fixed
// header's remaining length fixed up to match, so each variant is a
// well-framed but truncated packet of the same type.
func truncations(raw []byte) [][]byte {
	if len(raw) < 2 {
		return nil
	}
	r := bytes.NewReader(raw[1:])
	n, _, err := DecodeLength(r)
	if err != nil {
		return nil
	}
	start := len(raw) - r.Len()
	body := raw[start:]
	if n < len(body) {
		body = body[:n]
	}

	out := make([][]byte, 0, len(body))
	for cut := 0; cut < len(body); cut++ {
		var b bytes.Buffer
		b.WriteByte(raw[0])
		encodeLength(&b, int64(cut))
		b.Write(body[:cut])
		out = append(out, b.Bytes())
	}
	return out
}

// fuzzSeeds returns every raw packet from tpackets.go (valid and malformed
// cases, for every packet type), plus truncated variants of each, plus the
// packets that crashed the decoder upstream.
func fuzzSeeds() [][]byte {
	var seeds [][]byte
	for typ := Reserved; typ <= Auth; typ++ {
		for _, tc := range TPacketData[typ] {
			if len(tc.RawBytes) == 0 {
				continue
			}
			seeds = append(seeds, tc.RawBytes)
			seeds = append(seeds, truncations(tc.RawBytes)...)
		}
	}

	return append(seeds, issue501Packets...)
}

// issue501Packets are MQTT v5 SUBSCRIBE packets that end right after a topic
// filter, without the subscription options byte. On v2.7.9 they panic in
// SubscribeDecode with "index out of range"
// (https://github.com/mochi-mqtt/server/issues/501).
var issue501Packets = [][]byte{
	{Subscribe<<4 | 1<<1, 5, 0, 1, 0, 0, 0},                     // packet id 1, no properties, empty filter, no options byte
	{Subscribe<<4 | 1<<1, 6, 0, 1, 0, 0, 1, 'a'},                // filter "a", no options byte
	{Subscribe<<4 | 1<<1, 10, 0, 1, 0, 0, 1, 'a', 1, 0, 1, 'b'}, // second filter "b" without options byte
}

// TestDecodeMalformedNoPanic runs the fuzz seeds (every test packet and all
// its truncations) through the decoders without the fuzzing engine, so the
// property is checked on every `go test` run.
func TestDecodeMalformedNoPanic(t *testing.T) {
	seeds := fuzzSeeds()
	if len(seeds) < 1000 {
		t.Fatalf("expected at least 1000 seeds, got %d", len(seeds))
	}
	for _, s := range seeds {
		checkNoPanic(t, s)
	}
}

// TestIssue501SubscribeTruncated checks the exact truncated SUBSCRIBE packets
// return a malformed-packet error instead of panicking.
func TestIssue501SubscribeTruncated(t *testing.T) {
	for _, raw := range issue501Packets {
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("panic: %v", r)
				}
			}()
			return decodeStream(raw, 5)
		}()
		if err == nil || !errors.Is(err, ErrMalformedQos) {
			t.Errorf("% x: want ErrMalformedQos, got %v", raw, err)
		}
	}
}

// FuzzDecode decodes arbitrary bytes for each packet type the way the server
// does, with the protocol versions 3, 4 and 5, and must never panic. Run with
//
//	go test -run=^$ -fuzz=FuzzDecode -fuzztime=60s ./packets
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Every length and offset in a packet is relative, so bounds bugs show
		// up on small inputs; big inputs only slow the engine's minimizer down.
		if len(data) > 1<<10 {
			return
		}
		checkNoPanic(t, data)
	})
}
