// SPDX-License-Identifier: MIT

package mqtt

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// stackRecorder records, for every PUBLISH it is given to encode, whether
// publishToClient is on the encoding goroutine's stack.
type stackRecorder struct {
	HookBase
	inline, other atomic.Int64
}

func (h *stackRecorder) ID() string           { return "stack" }
func (h *stackRecorder) Provides(b byte) bool { return b == OnPacketEncode }
func (h *stackRecorder) OnPacketEncode(_ *Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Publish {
		buf := make([]byte, 64<<10)
		if bytes.Contains(buf[:runtime.Stack(buf, false)], []byte("publishToClient")) {
			h.inline.Add(1)
		} else {
			h.other.Add(1)
		}
	}
	return pk
}

// inlineSubscriber returns a server and a v3.1.1 client "sub" on the
// server's end of a loopback TCP connection, and the subscriber's end.
func inlineSubscriber(t *testing.T) (*Server, *Client, net.Conn) {
	server, client := tcpPair(t)
	s := newServer()
	s.Options.ClientNetWriteBufferSize = 1024
	cl := s.NewClient(server, "t", "sub", false)
	cl.ID = "sub"
	cl.Properties.ProtocolVersion = 4
	require.True(t, cl.rawWritable(), "a TCP connection takes the raw path")
	t.Cleanup(func() { cl.Stop(nil) })
	return s, cl, client
}

// TestPublishWritesInline (patch 101): a PUBLISH for a subscriber with an
// empty queue, on a plain TCP connection, is encoded and written by the
// publishing goroutine itself (publishToClient is on its stack), and has
// reached the subscriber's socket when publishToClient returns. Without
// the patch a writer goroutine of its own wrote each (0 of 20 inline:
// checked by making writeFirst return false).
func TestPublishWritesInline(t *testing.T) {
	s, cl, sub := inlineSubscriber(t)
	h := new(stackRecorder)
	require.NoError(t, s.AddHook(h, nil))
	const n = 20
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte{byte(i)}}
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk)
		require.NoError(t, err)
		require.NoError(t, sub.SetReadDeadline(time.Now().Add(10*time.Second)))
		_, err = io.ReadFull(sub, buf[:2+2+3+1])
		require.NoError(t, err)
		require.Equal(t, byte(i), buf[7], "packet %d", i)
		time.Sleep(2 * time.Millisecond) // a low rate
	}
	require.Equal(t, int64(n), h.inline.Load(), "PUBLISHes encoded by the publishing goroutine (others: %d)", h.other.Load())
	require.Zero(t, cl.State.outbound.len())
	require.False(t, cl.State.outbound.writing, "no writer left running")
}

// TestPublishInlineFullSocket (patch 101): publishing to a subscriber that
// does not read, over small socket buffers, never blocks the publisher (a
// write(2) the socket cannot take whole is finished by a writer
// goroutine), and once the subscriber reads it gets every message, whole
// and in order: the rest of a partly written packet goes out before the
// packets queued after it.
func TestPublishInlineFullSocket(t *testing.T) {
	s, cl, sub := inlineSubscriber(t)
	require.NoError(t, cl.Net.Conn.(*net.TCPConn).SetWriteBuffer(8<<10))
	const n, size = 400, 3000 // 1.2 MB, far above the buffers
	done := make(chan error, 1)
	go func() {
		payload := make([]byte, size)
		for i := 0; i < n; i++ {
			binary.BigEndian.PutUint32(payload, uint32(i))
			for j := 4; j < size; j++ {
				payload[j] = byte(i + j)
			}
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: append([]byte(nil), payload...)}
			if _, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk); err != nil {
				done <- err
				return
			}
			if i%4 == 0 {
				time.Sleep(100 * time.Microsecond) // let the queue drain now and then: inline writes again
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("the publisher blocked on a subscriber that does not read")
	}

	require.NoError(t, sub.SetReadDeadline(time.Now().Add(30*time.Second)))
	// PUBLISH QoS 0, v3.1.1: 0x30, remaining length (2 bytes for 3007), topic "a/b", payload
	pkt := make([]byte, 1+2+2+3+size)
	for i := 0; i < n; i++ {
		_, err := io.ReadFull(sub, pkt)
		require.NoError(t, err, "packet %d", i)
		require.Equal(t, byte(0x30), pkt[0], "packet %d: a PUBLISH where one starts", i)
		p := pkt[8:]
		require.Equal(t, uint32(i), binary.BigEndian.Uint32(p), "packet %d in order", i)
		for j := 4; j < size; j++ {
			if p[j] != byte(i+j) {
				t.Fatalf("packet %d: byte %d is %d, want %d", i, j, p[j], byte(i+j))
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for cl.State.outbound.len() > 0 || atomic.LoadInt32(&cl.State.outboundQty) > 0 {
		require.True(t, time.Now().Before(deadline), "queue drained")
		time.Sleep(time.Millisecond)
	}
	// Every packet counted whole, also those whose rest resumeWriter wrote.
	require.EqualValues(t, n*len(pkt), atomic.LoadInt64(&cl.ops.info.BytesSent), "BytesSent")
}

// TestPublishInlineLockBusy (patch 101): a subscriber that does not read
// has its read loop answer PINGREQs (direct writes) until one blocks on
// the full socket, holding cl.Lock, with no writer running. A publisher
// delivering to it must not wait for that write (nor would a node link's
// receive goroutine, or the take-over lock it holds): before the fix
// writeFirst took cl.Lock and blocked. The message is written after the
// PINGRESPs once the subscriber reads.
func TestPublishInlineLockBusy(t *testing.T) {
	s, cl, sub := inlineSubscriber(t)
	require.NoError(t, cl.Net.Conn.(*net.TCPConn).SetWriteBuffer(8<<10))
	require.NoError(t, sub.(*net.TCPConn).SetReadBuffer(4<<10))
	var pings atomic.Int64
	go func() { // stands in for the subscriber's read loop answering PINGREQs
		for {
			if err := cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingresp}}); err != nil {
				return
			}
			pings.Add(1)
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for last := int64(-1); ; { // until the PINGRESPs stop: a write blocks, holding cl.Lock
		time.Sleep(100 * time.Millisecond)
		n := pings.Load()
		if n == last && !cl.TryLock() {
			break
		} else if n == last {
			cl.Unlock()
		}
		last = n
		require.True(t, time.Now().Before(deadline), "a PINGRESP write blocks")
	}
	done := make(chan error, 1)
	go func() {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("x")}
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk)
		done <- err
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("the publisher waited for cl.Lock, held by a write to a subscriber's full socket")
	}

	// The subscriber reads: PINGRESPs (0xd0 0x00), then the PUBLISH.
	require.NoError(t, sub.SetReadDeadline(time.Now().Add(30*time.Second)))
	b := make([]byte, 2)
	for {
		_, err := io.ReadFull(sub, b)
		require.NoError(t, err)
		if b[0] != packets.Pingresp<<4 {
			break
		}
		require.Zero(t, b[1])
	}
	rest := make([]byte, 6)
	_, err := io.ReadFull(sub, rest)
	require.NoError(t, err)
	require.Equal(t, []byte{0x30, 6, 0, 3, 'a', '/', 'b', 'x'}, append(b, rest...), "the PUBLISH, whole, after the PINGRESPs")
}
