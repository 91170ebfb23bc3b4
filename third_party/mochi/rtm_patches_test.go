// SPDX-License-Identifier: MIT
// rtm patch: regression tests for rtm's patches to mochi v2.7.9, see PATCHES.md.

package mqtt

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestSendQuotaReturnedForQueuedPackets: with Receive Maximum 1, the second
// and third QoS 1 packets wait for quota. Acking the first releases the
// second; acking the second must release the third. On v2.7.9 a released
// packet was deleted from inflight when written, so its PUBACK returned no
// quota and the third packet (and everything after it) was never sent.
func TestSendQuotaReturnedForQueuedPackets(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }() // the client side reads everything

	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetSendQuota(1)
	s.Clients.Add(cl)

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   "a/b",
		Payload:     []byte("x"),
	}

	var ids []uint16
	for i := 0; i < 3; i++ {
		out, err := s.publishToClient(cl, sub, pk)
		require.NoError(t, err)
		ids = append(ids, out.PacketID)
	}
	require.Equal(t, int32(0), cl.State.Inflight.sendQuota)

	puback := func(id uint16) {
		t.Helper()
		require.NoError(t, s.processPacket(cl, packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Puback},
			PacketID:        id,
			ProtocolVersion: 5,
		}))
	}

	puback(ids[0]) // releases ids[1]
	second, ok := cl.State.Inflight.Get(ids[1])
	require.True(t, ok, "a released packet must stay inflight until it is acked")
	require.Equal(t, int64(0), second.Expiry, "released packet is marked as sent")

	puback(ids[1]) // must release ids[2]
	third, ok := cl.State.Inflight.Get(ids[2])
	require.True(t, ok)
	require.Equal(t, int64(0), third.Expiry, "third packet never released: send quota leaked")

	puback(ids[2])
	require.Equal(t, 0, cl.State.Inflight.Len())
	require.Equal(t, int32(1), cl.State.Inflight.sendQuota, "all quota returned")
}

// TestSendQuotaConcurrentNeverOutOfRange: publishers (DecreaseSendQuota, from
// each publisher's goroutine) and acks (IncreaseSendQuota, from the
// subscriber's goroutine) race on the same quota. It must stay within
// [0, max]; v2.7.9's load-then-add let it go below zero or above the maximum,
// which loses or invents quota for good.
func TestSendQuotaConcurrentNeverOutOfRange(t *testing.T) {
	in := NewInflights()
	in.ResetSendQuota(1)

	var bad atomic.Int32
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50000 && bad.Load() == 0; i++ {
				in.DecreaseSendQuota()
				if q := atomic.LoadInt32(&in.sendQuota); q < 0 || q > 1 {
					bad.Store(q)
				}
				in.IncreaseSendQuota()
				if q := atomic.LoadInt32(&in.sendQuota); q < 0 || q > 1 {
					bad.Store(q)
				}
			}
		}()
	}
	wg.Wait()
	require.Zero(t, bad.Load(), "send quota went out of [0, 1]: %d", bad.Load())
}

// panicHook panics in the hook event named by at.
type panicHook struct {
	HookBase
	at byte
}

func (h *panicHook) ID() string           { return "panic-hook" }
func (h *panicHook) Provides(b byte) bool { return b == h.at }
func (h *panicHook) OnConnect(*Client, packets.Packet) error {
	panic("boom in OnConnect")
}
func (h *panicHook) OnPacketRead(cl *Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Subscribe {
		panic("boom while handling SUBSCRIBE")
	}
	return pk, nil
}

// safeBuffer is a goroutine-safe log sink.
type safeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *safeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *safeBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newPanicServer(t *testing.T, at byte) (*Server, *safeBuffer) {
	t.Helper()
	logs := new(safeBuffer)
	s := New(&Options{Logger: slog.New(slog.NewTextHandler(logs, nil))})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	require.NoError(t, s.AddHook(&panicHook{at: at}, nil))
	return s, logs
}

// establish runs EstablishConnection on a pipe, writes the given packets, and
// returns the error EstablishConnection ended with. A panic that escapes it
// fails the test binary, which is the v2.7.9 behaviour.
func establish(t *testing.T, s *Server, raw ...[]byte) error {
	t.Helper()
	r, w := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.EstablishConnection("tcp", r) }()
	go func() { _, _ = io.Copy(io.Discard, w) }()
	for _, b := range raw {
		_ = w.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := w.Write(b); err != nil {
			break
		}
	}
	select {
	case err := <-done:
		_ = w.Close()
		return err
	case <-time.After(10 * time.Second):
		_ = w.Close()
		t.Fatal("connection not closed after the panic")
		return nil
	}
}

// TestRecoverPanicInPacketLoop: a panic while processing a client's packet
// (here from a hook; on v2.7.9 also from the SUBSCRIBE decoder, issue 501)
// closes that connection with ErrClientPanic and logs the client id and the
// stack at error level; the process and the server keep running.
func TestRecoverPanicInPacketLoop(t *testing.T) {
	s, logs := newPanicServer(t, OnPacketRead)
	defer s.Close()

	err := establish(t, s,
		packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes,
		packets.TPacketData[packets.Subscribe].Get(packets.TSubscribe).RawBytes,
	)
	require.ErrorIs(t, err, ErrClientPanic)

	out := logs.String()
	require.Contains(t, out, "level=ERROR")
	require.Contains(t, out, "recovered panic while serving client")
	require.Contains(t, out, "client=zen") // the client id of TConnectMqtt311
	require.Contains(t, out, "boom while handling SUBSCRIBE")
	require.Contains(t, out, "runtime/debug.Stack")

	// The server still serves new connections.
	err = establish(t, s,
		packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes,
		packets.TPacketData[packets.Disconnect].Get(packets.TDisconnect).RawBytes,
	)
	require.NoError(t, err)
}

// TestRecoverPanicInConnectPhase: a panic before the packet loop (here in the
// OnConnect hook) is recovered by attachClient and closes that connection.
func TestRecoverPanicInConnectPhase(t *testing.T) {
	s, logs := newPanicServer(t, OnConnect)
	defer s.Close()

	err := establish(t, s, packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes)
	require.ErrorIs(t, err, ErrClientPanic)
	require.Contains(t, logs.String(), "boom in OnConnect")
}

// TestIssue501TruncatedSubscribeOverPipe: the truncated MQTT 5 SUBSCRIBE
// from issue 501 after a valid CONNECT ends that connection with a malformed
// packet error (v2.7.9 panicked in SubscribeDecode and crashed the process).
func TestIssue501TruncatedSubscribeOverPipe(t *testing.T) {
	s := newServer()
	defer s.Close()

	err := establish(t, s,
		packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt5).RawBytes,
		[]byte{packets.Subscribe<<4 | 1<<1, 6, 0, 1, 0, 0, 1, 'a'}, // filter "a", no options byte
	)
	require.Error(t, err)
	require.True(t, errors.Is(err, packets.ErrMalformedQos), "got %v", err)
	require.False(t, strings.Contains(err.Error(), "panic"))
}

// TestGetByListenerConcurrentWriterNoDeadlock: Clients.GetByListener (used
// when a listener closes) read-locked twice on v2.7.9 (directly and via Len);
// with clients connecting and leaving meanwhile it hangs forever.
// https://github.com/mochi-mqtt/server/issues/488
func TestGetByListenerConcurrentWriterNoDeadlock(t *testing.T) {
	cls := NewClients()
	for i := 0; i < 4; i++ {
		cls.Add(&Client{ID: string(rune('a' + i)), Net: ClientConnection{Listener: "t1"}})
	}

	var stop atomic.Bool
	var wg sync.WaitGroup
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				_ = cls.GetByListener("t1")
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := &Client{ID: "w", Net: ClientConnection{Listener: "t1"}}
		for !stop.Load() {
			cls.Add(c)
			cls.Delete(c.ID)
		}
	}()

	time.Sleep(2 * time.Second)
	stop.Store(true)
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Fatal("deadlock: GetByListener stuck with a concurrent writer (recursive RLock)")
	}
}

// droppedHook counts OnPublishDropped calls.
type droppedHook struct {
	HookBase
	dropped atomic.Int32
}

func (h *droppedHook) ID() string           { return "dropped-hook" }
func (h *droppedHook) Provides(b byte) bool { return b == OnPublishDropped }
func (h *droppedHook) OnPublishDropped(*Client, packets.Packet) {
	h.dropped.Add(1)
}

// TestOutboundQueueLimitAndOrder: with MaximumClientWritesPending 5 and the
// WriteLoop not yet draining, 5 publishes are queued and the next ones are
// dropped exactly as with v2.7.9's channel (ErrPendingClientWritesExceeded,
// MessagesDropped, OnPublishDropped, QoS inflight and send quota rolled back);
// once the WriteLoop runs, the queued packets reach the wire in order.
func TestOutboundQueueLimitAndOrder(t *testing.T) {
	const limit, extra = 5, 3
	s := newServer()
	s.Options.Capabilities.MaximumClientWritesPending = limit
	hook := new(droppedHook)
	require.NoError(t, s.AddHook(hook, nil))

	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl := s.NewClient(w, "t", "sub", false)
	cl.Properties.ProtocolVersion = 4
	cl.State.Inflight.ResetSendQuota(100)
	s.Clients.Add(cl)

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	publish := func(i int) error {
		_, err := s.publishToClient(cl, sub, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   "a/b",
			Payload:     []byte{byte(i)},
		})
		return err
	}

	for i := 0; i < limit; i++ {
		require.NoError(t, publish(i))
	}
	for i := limit; i < limit+extra; i++ {
		require.ErrorIs(t, publish(i), packets.ErrPendingClientWritesExceeded)
	}
	require.Equal(t, int32(limit), atomic.LoadInt32(&cl.State.outboundQty))
	require.Equal(t, limit, cl.State.outbound.len())
	require.Equal(t, int64(extra), atomic.LoadInt64(&s.Info.MessagesDropped))
	require.Equal(t, int32(extra), hook.dropped.Load())
	require.Equal(t, limit, cl.State.Inflight.Len(), "dropped packets rolled back from inflight")
	require.Equal(t, int32(100-limit), atomic.LoadInt32(&cl.State.Inflight.sendQuota), "and their quota returned")

	go cl.WriteLoop()
	defer cl.Stop(nil)

	for i := 0; i < limit; i++ {
		_ = r.SetReadDeadline(time.Now().Add(5 * time.Second))
		fh := new(packets.FixedHeader)
		b := make([]byte, 1)
		_, err := io.ReadFull(r, b)
		require.NoError(t, err)
		require.NoError(t, fh.Decode(b[0]))
		rem, _, err := packets.DecodeLength(&byteReader{r})
		require.NoError(t, err)
		body := make([]byte, rem)
		_, err = io.ReadFull(r, body)
		require.NoError(t, err)
		require.Equal(t, byte(i), body[len(body)-1], "packet %d out of order", i)
	}

	require.Eventually(t, func() bool { return atomic.LoadInt32(&cl.State.outboundQty) == 0 }, 5*time.Second, time.Millisecond)
	require.NoError(t, publish(99), "room again once drained")
}

type byteReader struct{ r io.Reader }

func (b *byteReader) ReadByte() (byte, error) {
	var p [1]byte
	_, err := io.ReadFull(b.r, p[:])
	return p[0], err
}

// TestOutboundQueueIdleCostsNothing: an idle client's queue holds no array;
// it grows on demand up to the limit and releases a large array once drained.
func TestOutboundQueueIdleCostsNothing(t *testing.T) {
	q := newOutboundQueue(8192)
	require.Nil(t, q.buf, "no backing array while idle (v2.7.9: 64 KiB channel)")

	for i := 0; i < 1000; i++ {
		require.True(t, q.push(&packets.Packet{PacketID: uint16(i)}))
	}
	require.GreaterOrEqual(t, cap(q.buf), 1000)
	require.LessOrEqual(t, cap(q.buf), 2048)
	for i := 0; i < 1000; i++ {
		pk, ok := q.pop()
		require.True(t, ok)
		require.Equal(t, uint16(i), pk.PacketID)
	}
	_, ok := q.pop()
	require.False(t, ok)
	require.Nil(t, q.buf, "array released when drained")

	// Small arrays are kept: a client receiving now and then does not
	// allocate per message.
	require.True(t, q.push(&packets.Packet{}))
	_, _ = q.pop()
	require.NotNil(t, q.buf)
	require.LessOrEqual(t, cap(q.buf), outboundQueueKeep)

	// Wrap-around keeps FIFO order while growing.
	q = newOutboundQueue(10)
	next := 0
	for i := 0; i < 100; i++ {
		for q.push(&packets.Packet{PacketID: uint16(i)}) == false {
			pk, ok := q.pop()
			require.True(t, ok)
			require.Equal(t, uint16(next), pk.PacketID)
			next++
		}
		if i%3 == 0 {
			pk, ok := q.pop()
			require.True(t, ok)
			require.Equal(t, uint16(next), pk.PacketID)
			next++
		}
	}
	require.LessOrEqual(t, cap(q.buf), 10)
}
