package link

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// sampleFrames holds a valid frame of every type.
func sampleFrames() []Frame {
	var n, mac [32]byte
	for i := range n {
		n[i], mac[i] = byte(i), byte(255-i)
	}
	return []Frame{
		{Type: FrameHello, Version: ProtocolVersion, Node: "node-a", Incarnation: 1<<63 + 5, Stream: 42, Heartbeat: time.Second, Nonce: n},
		{Type: FrameHello, Version: 2},
		{Type: FrameChallenge, Node: "node-b", Nonce: n, MAC: mac},
		{Type: FrameAuth, MAC: mac},
		{Type: FrameReady, Seq: 12345},
		{Type: FrameReady, Seq: 9, Incarnation: 1<<63 + 3},
		{Type: FrameData, Seq: 7, Msg: Message{Type: typeData, Body: []byte("hello")}},
		{Type: FrameData, Seq: 0, Msg: Message{Type: 255, Body: []byte{}}},
		{Type: FrameAck, Seq: 1<<64 - 1},
		{Type: FramePing},
		{Type: FrameReject, Reason: "bad cluster secret"},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	var all []byte
	for _, f := range sampleFrames() {
		b := AppendFrame(nil, f)
		got, n, err := DecodeFrame(b, 1<<10)
		if err != nil || n != len(b) || !reflect.DeepEqual(got, f) {
			t.Errorf("%v: DecodeFrame = %+v, %d, %v; want %+v, %d, nil", f.Type, got, n, err, f, len(b))
		}
		// A frame cut short is incomplete, not an error.
		if _, n, err := DecodeFrame(b[:len(b)-1], 1<<10); n != 0 || err != nil {
			t.Errorf("%v cut short: n=%d err=%v, want 0, nil", f.Type, n, err)
		}
		all = append(all, b...)
	}
	// The reader, fed one byte at a time, sees the same frames.
	r := newFrameReader(iotest.OneByteReader(bytes.NewReader(all)), 16, 1<<10)
	for _, want := range sampleFrames() {
		got, err := r.next()
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("reader: %+v, %v; want %+v", got, err, want)
		}
	}
	if _, err := r.next(); err != io.EOF {
		t.Fatalf("reader at the end: %v, want EOF", err)
	}
}

// TestReadyWithoutIncarnation: a ready frame from a node that does not send
// its incarnation decodes, with incarnation 0 (unknown).
func TestReadyWithoutIncarnation(t *testing.T) {
	f, n, err := DecodeFrame([]byte{0, 0, 0, 2, byte(FrameReady), 5}, 1<<10)
	if err != nil || n != 6 || !reflect.DeepEqual(f, Frame{Type: FrameReady, Seq: 5}) {
		t.Fatalf("DecodeFrame = %+v, %d, %v; want ready seq 5, incarnation 0", f, n, err)
	}
}

func TestDecodeFrameErrors(t *testing.T) {
	data := func(body ...byte) []byte {
		return append([]byte{0, 0, 0, byte(1 + len(body)), byte(FrameData)}, body...)
	}
	long := AppendFrame(nil, Frame{Type: FrameChallenge, Node: strings.Repeat("x", MaxNodeName+1)})
	for _, tc := range []struct {
		name string
		b    []byte
		want error
		text string
	}{
		{"zero length", []byte{0, 0, 0, 0}, ErrMalformedFrame, "zero length"},
		{"too large", []byte{0, 0, 4, 1}, ErrFrameTooLarge, "1025 bytes, limit 1024"},
		{"huge", []byte{0xff, 0xff, 0xff, 0xff}, ErrFrameTooLarge, "limit"},
		{"unknown type", []byte{0, 0, 0, 1, 99}, ErrMalformedFrame, "unknown frame type 99"},
		{"reserved message type", data(1, 15, 'x'), ErrMalformedFrame, "reserved message type 15"},
		{"data without type", data(1), ErrMalformedFrame, "missing message type"},
		{"bad varint", data(0x80), ErrMalformedFrame, "bad seq"},
		{"trailing bytes", []byte{0, 0, 0, 2, byte(FramePing), 0}, ErrMalformedFrame, "1 trailing bytes"},
		{"short auth", []byte{0, 0, 0, 3, byte(FrameAuth), 1, 2}, ErrMalformedFrame, "short mac"},
		{"long node", long, ErrMalformedFrame, "node length 256 out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, n, err := DecodeFrame(tc.b, 1<<10)
			if !errors.Is(err, tc.want) || n != 0 || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("DecodeFrame: n=%d err=%v; want 0 and %v containing %q", n, err, tc.want, tc.text)
			}
		})
	}
}

// FuzzFrame checks that DecodeFrame never panics, that what it accepts
// re-encodes to the same frame, and that the connection's reader, fed the
// input one byte at a time, finds exactly the frames DecodeFrame finds.
func FuzzFrame(f *testing.F) {
	var all []byte
	for _, fr := range sampleFrames() {
		b := AppendFrame(nil, fr)
		f.Add(b)
		all = append(all, b...)
	}
	f.Add(all)
	f.Add(AppendFrame(nil, Frame{Type: FrameData, Seq: 1, Msg: Message{Type: typeData, Body: bytes.Repeat([]byte("x"), 200)}}))
	f.Add([]byte{0, 0, 0, 2, byte(FrameReady), 5}) // a ready without the incarnation (older nodes)
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		const max = 4 << 10
		var want []Frame
		off, wantErr := 0, false
		for {
			fr, n, err := DecodeFrame(b[off:], max)
			if err != nil {
				if n != 0 {
					t.Fatalf("error %v with n=%d", err, n)
				}
				wantErr = true
				break
			}
			if n == 0 {
				break
			}
			if n < 5 || n > len(b)-off {
				t.Fatalf("n=%d out of range (%d bytes left)", n, len(b)-off)
			}
			enc := AppendFrame(nil, fr)
			again, n2, err := DecodeFrame(enc, max)
			if err != nil || n2 != len(enc) || !reflect.DeepEqual(again, fr) {
				t.Fatalf("re-encoded %+v decodes to %+v, %d, %v", fr, again, n2, err)
			}
			want = append(want, fr)
			off += n
		}

		r := newFrameReader(iotest.OneByteReader(bytes.NewReader(b)), 64, max)
		for i := 0; ; i++ {
			fr, err := r.next()
			if err == nil {
				if i >= len(want) || !reflect.DeepEqual(fr, want[i]) {
					t.Fatalf("reader frame %d = %+v, DecodeFrame found %d frames", i, fr, len(want))
				}
				continue
			}
			if i != len(want) {
				t.Fatalf("reader stopped after %d frames (%v), DecodeFrame found %d", i, err, len(want))
			}
			eof := err == io.EOF || err == io.ErrUnexpectedEOF
			switch {
			case wantErr && eof:
				t.Fatalf("reader ended with %v, DecodeFrame failed", err)
			case !wantErr && !eof:
				t.Fatalf("reader failed with %v, DecodeFrame did not", err)
			case !wantErr && (err == io.EOF) != (off == len(b)):
				t.Fatalf("reader ended with %v at offset %d of %d", err, off, len(b))
			}
			return
		}
	})
}
