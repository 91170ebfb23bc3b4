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
// writer blocked on a connection nobody reads (it holds the first packet), 5
// more publishes are queued and the next ones are dropped exactly as with
// v2.7.9's channel (ErrPendingClientWritesExceeded, MessagesDropped,
// OnPublishDropped, QoS inflight and send quota rolled back); once the
// connection is read, the packets reach the wire in order, the writer exits
// when the queue is empty, and the next publish starts a new one.
func TestOutboundQueueLimitAndOrder(t *testing.T) {
	const limit, extra = 5, 3
	s := newServer()
	s.Options.Capabilities.MaximumClientWritesPending = limit
	hook := new(droppedHook)
	require.NoError(t, s.AddHook(hook, nil))

	// Each packet goes straight to the socket, so the writer blocks on the
	// first one; otherwise it batches into its buffer and drains the queue.
	s.Options.ClientNetWriteBufferSize = 1
	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl := s.NewClient(w, "t", "sub", false)
	cl.Properties.ProtocolVersion = 4
	cl.State.Inflight.ResetSendQuota(100)
	s.Clients.Add(cl)
	defer cl.Stop(nil)

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	publish := func(i int) error {
		_, err := s.publishToClient(cl, sub, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   "a/b",
			Payload:     []byte{byte(i)},
		})
		return err
	}
	writing := func() bool {
		cl.State.outbound.mu.Lock()
		defer cl.State.outbound.mu.Unlock()
		return cl.State.outbound.writing
	}

	require.False(t, writing(), "no writer while idle")
	require.NoError(t, publish(0)) // starts the writer, which blocks writing it
	require.Eventually(t, func() bool { return cl.State.outbound.len() == 0 }, 5*time.Second, time.Millisecond)
	require.True(t, writing())
	for i := 1; i <= limit; i++ {
		require.NoError(t, publish(i))
	}
	for i := limit + 1; i <= limit+extra; i++ {
		require.ErrorIs(t, publish(i), packets.ErrPendingClientWritesExceeded)
	}
	require.Equal(t, int32(limit+1), atomic.LoadInt32(&cl.State.outboundQty))
	require.Equal(t, limit, cl.State.outbound.len())
	require.Equal(t, int64(extra), atomic.LoadInt64(&s.Info.MessagesDropped))
	require.Equal(t, int32(extra), hook.dropped.Load())
	require.Equal(t, limit+1, cl.State.Inflight.Len(), "dropped packets rolled back from inflight")
	require.Equal(t, int32(100-limit-1), atomic.LoadInt32(&cl.State.Inflight.sendQuota), "and their quota returned")

	readPayload := func() byte {
		t.Helper()
		_, body, err := readRawPacket(r)
		require.NoError(t, err)
		return body[len(body)-1]
	}
	for i := 0; i <= limit; i++ {
		require.Equal(t, byte(i), readPayload(), "packet %d out of order", i)
	}
	require.Eventually(t, func() bool { return atomic.LoadInt32(&cl.State.outboundQty) == 0 && !writing() },
		5*time.Second, time.Millisecond, "the writer exits once the queue is empty")

	require.NoError(t, publish(99), "room again once drained")
	require.Equal(t, byte(99), readPayload(), "a new writer was started")
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

	push := func(pk *packets.Packet) bool {
		ok, _ := q.push(pk)
		return ok
	}
	for i := 0; i < 1000; i++ {
		require.True(t, push(&packets.Packet{PacketID: uint16(i)}))
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
	require.True(t, push(&packets.Packet{}))
	_, _ = q.pop()
	require.NotNil(t, q.buf)
	require.LessOrEqual(t, cap(q.buf), outboundQueueKeep)

	// Wrap-around keeps FIFO order while growing.
	q = newOutboundQueue(10)
	next := 0
	for i := 0; i < 100; i++ {
		for !push(&packets.Packet{PacketID: uint16(i)}) {
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

// TestOutboundQueueOneWriter: the push that finds no writer running asks for
// one, later pushes do not, and the writer is counted as stopped when it
// finds the queue empty, so the next push asks again: at most one writer, and
// never a queued packet without one. v2.7.9 ran a WriteLoop goroutine per
// connection, idle or not (4 KiB of stack each).
func TestOutboundQueueOneWriter(t *testing.T) {
	q := newOutboundQueue(8)
	ok, start := q.push(&packets.Packet{PacketID: 1})
	require.True(t, ok)
	require.True(t, start, "first push starts a writer")
	ok, start = q.push(&packets.Packet{PacketID: 2})
	require.True(t, ok)
	require.False(t, start, "a writer is running")
	require.False(t, q.claim())

	for id := uint16(1); id <= 2; id++ {
		pk, ok := q.pop()
		require.True(t, ok)
		require.Equal(t, id, pk.PacketID)
	}
	_, ok = q.pop()
	require.False(t, ok, "empty: the writer exits")
	_, start = q.push(&packets.Packet{PacketID: 3})
	require.True(t, start, "next push starts a new writer")

	// Concurrent pushers and writers: every packet written exactly once,
	// in order, by one writer at a time.
	q = newOutboundQueue(1 << 20)
	var mu sync.Mutex
	var got []uint16
	var wg sync.WaitGroup
	writer := func() {
		defer wg.Done()
		for {
			pk, ok := q.pop()
			if !ok {
				return
			}
			mu.Lock()
			got = append(got, pk.PacketID)
			mu.Unlock()
		}
	}
	const n = 20000
	for i := 0; i < n; i++ {
		if _, start := q.push(&packets.Packet{PacketID: uint16(i)}); start {
			wg.Add(1)
			go writer()
		}
	}
	wg.Wait()
	require.Len(t, got, n)
	for i, id := range got {
		require.Equal(t, uint16(i), id)
	}
}

// TestInflightGetAllInArrivalOrder: packets queued in the same second come
// out of GetAll (and so out of ResendInflightMessages, on reconnect) in the
// order they were added [MQTT-4.6.0-1], whatever their packet ids; a reused
// id takes its new place; a clone keeps the order. v2.7.9 sorted by
// uint16(Created), whole seconds, leaving same-second packets in map order.
func TestInflightGetAllInArrivalOrder(t *testing.T) {
	in := NewInflights()
	var want []uint16
	for i := 0; i < 100; i++ {
		id := uint16((i*7919)%65535 + 1) // not increasing
		in.Set(packets.Packet{PacketID: id, Created: 1700000000})
		want = append(want, id)
	}
	require.True(t, in.Delete(want[10]))
	in.Set(packets.Packet{PacketID: want[10], Created: 1700000000})
	want = append(append(want[:10:10], want[11:]...), want[10])
	in.Set(packets.Packet{PacketID: want[0], Created: 1700000000, Payload: []byte("updated")}) // keeps its place

	ids := func(pks []packets.Packet) []uint16 {
		var out []uint16
		for _, pk := range pks {
			out = append(out, pk.PacketID)
		}
		return out
	}
	require.Equal(t, want, ids(in.GetAll(false)))
	require.Equal(t, want, ids(in.Clone().GetAll(false)))
}

// TestNextImmediateReusedPacketID: packets waiting for send quota are
// released oldest first even when a packet id is reused: 5 and 7 wait, 5 is
// dropped and its id reused by a newer waiting packet, so 7 goes first.
// Before this patch the FIFO held bare ids and released the new 5 first.
func TestNextImmediateReusedPacketID(t *testing.T) {
	in := NewInflights()
	in.Set(packets.Packet{PacketID: 5, Expiry: -1, Payload: []byte("old 5")})
	in.Set(packets.Packet{PacketID: 7, Expiry: -1})
	require.True(t, in.Delete(5))
	in.Set(packets.Packet{PacketID: 5, Expiry: -1, Payload: []byte("new 5")})

	pk, ok := in.NextImmediate()
	require.True(t, ok)
	require.Equal(t, uint16(7), pk.PacketID)
	pk, ok = in.NextImmediate()
	require.True(t, ok)
	require.Equal(t, "new 5", string(pk.Payload))
	_, ok = in.NextImmediate()
	require.False(t, ok)
}

// readRawPacket reads one packet from the client end of a pipe.
func readRawPacket(r net.Conn) (byte, []byte, error) {
	_ = r.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := &byteReader{r}
	hb, err := br.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, _, err := packets.DecodeLength(br)
	if err != nil {
		return 0, nil, err
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return hb, body, err
}

// TestResendInflightMessagesInOrder: a session's queued QoS 1 messages, all
// queued within the same second, are resent on reconnect in the order they
// were queued (the live version is broker TestPersistentSession).
func TestResendInflightMessagesInOrder(t *testing.T) {
	cl, r, w := newTestClient()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl.Properties.ProtocolVersion = 4
	const n = 50
	for i := 0; i < n; i++ {
		cl.State.Inflight.Set(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   "a/b",
			Payload:     []byte{byte(i)},
			PacketID:    uint16(n - i), // ids decreasing
			Created:     1700000000,
		})
	}
	go func() { _ = cl.ResendInflightMessages(true) }()
	for i := 0; i < n; i++ {
		hb, body, err := readRawPacket(r)
		require.NoError(t, err)
		require.Equal(t, byte(packets.Publish<<4|1<<3|1<<1), hb, "PUBLISH QoS 1 DUP")
		require.Equal(t, byte(i), body[len(body)-1], "message %d resent out of order", i)
	}
}

// TestNextPacketIDNotBlockedByWrite: allocating a packet id for a client does
// not wait for a write to that client. On v2.7.9 NextPacketID took the
// client's lock, which WritePacket holds across the network write, so every
// publisher to a subscriber that stopped reading blocked with it.
func TestNextPacketIDNotBlockedByWrite(t *testing.T) {
	cl, r, w := newTestClient() // nobody reads r: writes to w block
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl.Properties.ProtocolVersion = 4

	writing := make(chan struct{})
	go func() {
		close(writing)
		_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b"})
	}()
	<-writing
	time.Sleep(50 * time.Millisecond) // the write holds the client's lock, blocked

	got := make(chan error, 1)
	go func() {
		_, err := cl.NextPacketID()
		got <- err
	}()
	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(2 * time.Second):
		t.Fatal("NextPacketID blocked behind a write to the client")
	}
}

// droppedLenHook records OnPublishDropped calls with the size of the
// client's session when called.
type droppedLenHook struct {
	HookBase
	mu   sync.Mutex
	lens []int
}

func (h *droppedLenHook) ID() string           { return "dropped-len-hook" }
func (h *droppedLenHook) Provides(b byte) bool { return b == OnPublishDropped }
func (h *droppedLenHook) OnPublishDropped(cl *Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lens = append(h.lens, cl.State.Inflight.Len())
}

// TestSessionFullCallsOnPublishDropped: a QoS 1 message dropped because the
// client's session already holds MaximumInflight messages (here an offline
// session) is reported to OnPublishDropped, without a Warn per message
// (v2.7.9: only Info.InflightDropped and a Warn per message, nothing a hook
// could attribute). A message dropped because the write queue is full is
// reported after it was rolled back from the session (and from Info.Inflight,
// which v2.7.9 left counting it), so a hook can tell the two apart by the
// session's size.
func TestSessionFullCallsOnPublishDropped(t *testing.T) {
	logs := new(safeBuffer)
	s := New(&Options{Logger: slog.New(slog.NewTextHandler(logs, nil))})
	s.Options.Capabilities.MaximumInflight = 3
	s.Options.Capabilities.MaximumClientWritesPending = 2
	hook := new(droppedLenHook)
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	require.NoError(t, s.AddHook(hook, nil))
	dropped := func() []int {
		hook.mu.Lock()
		defer hook.mu.Unlock()
		return append([]int(nil), hook.lens...)
	}

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	publish := func(cl *Client) error {
		_, err := s.publishToClient(cl, sub, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   "a/b",
		})
		return err
	}

	// Session full: an offline session keeps 3 messages, drops the next 2.
	offline := s.NewClient(nil, "t", "offline", false)
	offline.Properties.ProtocolVersion = 4
	for i := 0; i < 3; i++ {
		require.ErrorIs(t, publish(offline), packets.CodeDisconnect) // kept for the session
	}
	for i := 0; i < 2; i++ {
		require.ErrorIs(t, publish(offline), packets.ErrQuotaExceeded)
	}
	require.Equal(t, []int{3, 3}, dropped(), "OnPublishDropped called for each, with the session full")
	require.Equal(t, int64(2), atomic.LoadInt64(&s.Info.InflightDropped))
	require.Zero(t, atomic.LoadInt64(&s.Info.MessagesDropped))
	require.NotContains(t, logs.String(), "level=WARN", "no Warn per dropped message")

	// Queue full: nobody reads the pipe, so the write queue (2, plus the
	// packet the writer holds) fills while the session (10) has room; the
	// hook runs after the rollback.
	s.Options.Capabilities.MaximumInflight = 10
	s.Options.ClientNetWriteBufferSize = 1 // the writer blocks on its first packet
	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl := s.NewClient(w, "t", "stuck", false)
	cl.Properties.ProtocolVersion = 4
	defer cl.Stop(nil)
	var err error
	for i := 0; i < 5 && err == nil; i++ {
		err = publish(cl)
	}
	require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	lens := dropped()
	require.Len(t, lens, 3)
	require.Equal(t, cl.State.Inflight.Len(), lens[2], "the hook sees the session without the dropped message")
	require.Less(t, lens[2], 10)
	require.Equal(t, int64(offline.State.Inflight.Len()+cl.State.Inflight.Len()), atomic.LoadInt64(&s.Info.Inflight),
		"Info.Inflight counts what the sessions hold")
}

// v5ConnectRaw is an MQTT 5 CONNECT (clean start, keepalive 60, no
// properties) for client id "c".
var v5ConnectRaw = []byte{packets.Connect << 4, 14, 0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 60, 0, 0, 1, 'c'}

// TestOversizedPacketDisconnectsV5Client: a v5 client sending a packet larger
// than the server's Maximum Packet Size gets DISCONNECT 0x95 (packet too
// large) before its connection is closed [MQTT-4.13.1-1]; v2.7.9 closed it
// without a word. A v3.1.1 client gets no DISCONNECT (3.1.1 has none from
// the server): its connection is just closed.
func TestOversizedPacketDisconnectsV5Client(t *testing.T) {
	for _, tc := range []struct {
		name    string
		connect []byte
		want    []byte // after the CONNACK, before EOF
	}{
		{"v5", v5ConnectRaw, []byte{packets.Disconnect << 4, 1, packets.ErrPacketTooLarge.Code}},
		{"v3", packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer()
			defer s.Close()
			s.Options.Capabilities.MaximumPacketSize = 64

			r, w := net.Pipe()
			defer func() { _ = r.Close(); _ = w.Close() }()
			done := make(chan error, 1)
			go func() { done <- s.EstablishConnection("tcp", r) }()
			go func() {
				_, _ = w.Write(tc.connect)
				big := append([]byte{packets.Publish << 4, 100, 0, 3, 'a', '/', 'b'}, make([]byte, 95)...)
				_, _ = w.Write(big)
			}()

			hb, _, err := readRawPacket(w)
			require.NoError(t, err)
			require.Equal(t, byte(packets.Connack<<4), hb)
			_ = w.SetReadDeadline(time.Now().Add(5 * time.Second))
			rest, err := io.ReadAll(w)
			require.NoError(t, err)
			if len(tc.want) > 0 {
				require.GreaterOrEqual(t, len(rest), 3, "no DISCONNECT before the close")
				require.Equal(t, byte(packets.Disconnect<<4), rest[0])
				require.Equal(t, packets.ErrPacketTooLarge.Code, rest[2], "DISCONNECT reason")
			} else {
				require.Empty(t, rest, "v3.1.1: the connection is closed, nothing is sent")
			}
			require.ErrorIs(t, <-done, packets.ErrPacketTooLarge)
		})
	}
}

// TestDisconnectClientV3SendsNothing: DisconnectClient (server shutdown,
// session takeover, protocol errors) sends an MQTT 5 client a DISCONNECT with
// the reason, but an MQTT 3.1.1 client nothing: 3.1.1 has no server-to-client
// DISCONNECT, and clients treat one as a protocol violation. Its connection is
// closed, also in PassiveClientDisconnect mode, where nothing else would tell
// it. v2.7.9 sent the DISCONNECT packet to every client.
func TestDisconnectClientV3SendsNothing(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version byte
		passive bool
		want    []byte
	}{
		{"v5", 5, false, []byte{packets.Disconnect << 4, 1, packets.ErrServerShuttingDown.Code}},
		{"v3", 4, false, nil},
		{"v3-passive", 4, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer()
			s.Options.Capabilities.Compatibilities.PassiveClientDisconnect = tc.passive
			cl, r, w := newTestClient()
			defer func() { _ = r.Close(); _ = w.Close() }()
			cl.Properties.ProtocolVersion = tc.version

			got := make(chan []byte, 1)
			go func() {
				_ = r.SetReadDeadline(time.Now().Add(5 * time.Second))
				b, _ := io.ReadAll(r)
				got <- b
			}()
			err := s.DisconnectClient(cl, packets.ErrServerShuttingDown)
			require.ErrorIs(t, err, packets.ErrServerShuttingDown)
			if tc.version < 5 {
				require.True(t, cl.Closed(), "v3.1.1 client disconnected by closing its connection")
			} else {
				_ = w.Close()
			}
			b := <-got
			if tc.want == nil {
				require.Empty(t, b, "no DISCONNECT packet for a v3.1.1 client")
			} else {
				require.GreaterOrEqual(t, len(b), 3)
				require.Equal(t, tc.want[0], b[0])
				require.Equal(t, tc.want[2], b[2])
			}
		})
	}
}

// ackOrderHook records, when a PUBACK or PUBREC is written, how many
// messages an offline subscriber's session holds.
type ackOrderHook struct {
	HookBase
	sub  *Client
	seen chan int
}

func (h *ackOrderHook) ID() string { return "ack-order" }
func (h *ackOrderHook) Provides(b byte) bool {
	return b == OnPacketSent
}
func (h *ackOrderHook) OnPacketSent(cl *Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type == packets.Puback || pk.FixedHeader.Type == packets.Pubrec {
		h.seen <- h.sub.State.Inflight.Len()
	}
}

// TestAckAfterFanOut: a QoS 1 or 2 PUBLISH is acknowledged only once it is
// in every matching session. On v2.7.9 the acknowledgement was written
// first, so the session of an offline subscriber was still empty then.
func TestAckAfterFanOut(t *testing.T) {
	for _, qos := range []byte{1, 2} {
		s := newServer()
		sub := s.NewClient(nil, "t", "offline-sub", false)
		sub.Properties.ProtocolVersion = 5
		s.Clients.Add(sub)
		s.Topics.Subscribe(sub.ID, packets.Subscription{Filter: "a/b", Qos: 1})
		sub.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
		hook := &ackOrderHook{sub: sub, seen: make(chan int, 1)}
		require.NoError(t, s.AddHook(hook, nil))

		r, w := net.Pipe()
		pub := s.NewClient(w, "t", "publisher", false)
		pub.Properties.ProtocolVersion = 5
		pub.State.Inflight.ResetReceiveQuota(10)
		go func() { _, _ = io.Copy(io.Discard, r) }()
		err := s.processPacket(pub, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
			TopicName:   "a/b",
			Payload:     []byte("x"),
			PacketID:    7,
		})
		require.NoError(t, err)
		select {
		case n := <-hook.seen:
			require.Equal(t, 1, n, "QoS %d: the subscriber's session when the publisher was acknowledged", qos)
		case <-time.After(5 * time.Second):
			t.Fatalf("QoS %d: no acknowledgement written", qos)
		}
		_ = w.Close()
		_ = r.Close()
	}
}

// waitOutboundDrained waits until cl's write queue is empty and its writer
// has finished, replacing upstream tests' fixed sleeps, which were too short
// once the writer goroutine is started on demand (patch 12).
func waitOutboundDrained(cl *Client) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		cl.State.outbound.mu.Lock()
		idle := cl.State.outbound.n.Load() == 0 && !cl.State.outbound.writing
		cl.State.outbound.mu.Unlock()
		if idle {
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestPublishToForbiddenTopicIsAcknowledged: a QoS 1 PUBLISH to $SYS gets a
// negative PUBACK (MQTT 5); v2.7.9 sent nothing and the client waited
// forever. (Wildcards in a topic name are a protocol error, caught before.)
func TestPublishToForbiddenTopicIsAcknowledged(t *testing.T) {
	for _, tc := range []struct {
		topic string
		code  byte
	}{{"$SYS/x", packets.ErrNotAuthorized.Code}, {"$sys/y", packets.ErrNotAuthorized.Code}} {
		s := newServer()
		cl, r, w := newTestClient()
		cl.Properties.ProtocolVersion = 5
		done := make(chan error, 1)
		go func() {
			done <- s.processPacket(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
				TopicName: tc.topic, PacketID: 7, ProtocolVersion: 5})
		}()
		hdr, body, err := readRawPacket(r)
		require.NoError(t, err)
		require.Equal(t, packets.Puback, hdr>>4, tc.topic)
		require.GreaterOrEqual(t, len(body), 3)
		require.Equal(t, tc.code, body[2], tc.topic)
		require.NoError(t, <-done)
		_ = w.Close()
		_ = r.Close()
	}
}
