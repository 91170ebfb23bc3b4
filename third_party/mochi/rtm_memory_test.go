// SPDX-License-Identifier: MIT
// rtm patch: regression tests for rtm's patches 40-44 (byte bounds on what
// clients and strangers make the server hold), see PATCHES.md.

package mqtt

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// bytesHook records OnPublishDroppedBytes calls by reason.
type bytesHook struct {
	HookBase
	mu      sync.Mutex
	reasons map[error]int
}

func (h *bytesHook) ID() string           { return "bytes-hook" }
func (h *bytesHook) Provides(b byte) bool { return b == OnPublishDroppedBytes }
func (h *bytesHook) OnPublishDroppedBytes(_ *Client, _ packets.Packet, reason error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.reasons == nil {
		h.reasons = map[error]int{}
	}
	h.reasons[reason]++
}
func (h *bytesHook) count(reason error) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.reasons[reason]
}

// stuckClient adds a connected v3.1.1 client whose socket is never read (a
// net.Pipe nobody reads: its writer blocks on the first packet), subscribed
// to filter at qos.
func stuckClient(t *testing.T, s *Server, id, filter string, qos byte) *Client {
	t.Helper()
	r, w := net.Pipe()
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	cl := s.NewClient(w, "t", id, false)
	cl.Properties.ProtocolVersion = 4
	s.Clients.Add(cl)
	s.Topics.Subscribe(id, packets.Subscription{Filter: filter, Qos: qos})
	cl.State.Subscriptions.Add(filter, packets.Subscription{Filter: filter, Qos: qos})
	return cl
}

func bigPublish(topic string, qos byte, size int) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		Payload:     make([]byte, size),
	}
}

// TestClientBytesBound (patch 40): a client that does not read holds at
// most MaxClientBytes of messages (plus the one its writer is blocked on),
// in its write queue (QoS 0) and its session (QoS 1); the rest is dropped
// and reported with ErrClientBytesExceeded. On v2.7.9 only the message count
// (here 1,000) bounded it: 100 messages of 10 KiB were all held.
func TestClientBytesBound(t *testing.T) {
	for _, qos := range []byte{0, 1} {
		t.Run(string(rune('0'+qos)), func(t *testing.T) {
			s := newServer()
			s.Options.Capabilities.MaximumInflight = 1000
			s.Options.Capabilities.MaximumClientWritesPending = 1000
			s.Options.Memory.MaxClientBytes = 64 << 10
			h := new(bytesHook)
			require.NoError(t, s.AddHook(h, nil))
			cl := stuckClient(t, s, "stuck", "big", qos)

			const size = 10 << 10
			for i := 0; i < 100; i++ {
				s.publishToSubscribers(bigPublish("big", qos, size))
			}
			held := cl.HeldBytes()
			require.LessOrEqual(t, held, int64(64<<10+size+3), "bytes held for the stuck client")
			require.Greater(t, held, int64(32<<10))
			require.Equal(t, 100-int(held/(size+3)), h.count(ErrClientBytesExceeded), "drops reported")
			require.Equal(t, held, s.Mem.Queued.Load(), "the total counts the client's bytes")

			if qos == 1 {
				// Acknowledging releases the bytes.
				for _, pk := range cl.State.Inflight.GetAll(false) {
					require.NoError(t, s.processPuback(cl, packets.Packet{PacketID: pk.PacketID}))
				}
				require.Zero(t, cl.HeldBytes())
				require.Zero(t, s.Mem.Queued.Load())
			}
		})
	}
}

// TestClientBytesBoundAdmitsOneLargeMessage (patch 40): a client holding
// nothing takes a message larger than the bound, so a subscriber that keeps
// up still receives it.
func TestClientBytesBoundAdmitsOneLargeMessage(t *testing.T) {
	s := newServer()
	s.Options.Memory.MaxClientBytes = 1 << 10
	h := new(bytesHook)
	require.NoError(t, s.AddHook(h, nil))
	cl := stuckClient(t, s, "c", "big", 1)
	s.publishToSubscribers(bigPublish("big", 1, 4<<10))
	require.Equal(t, 1, cl.State.Inflight.Len())
	s.publishToSubscribers(bigPublish("big", 1, 10))
	require.Equal(t, 1, h.count(ErrClientBytesExceeded))
}

// TestMemoryBudget (patch 41): stuck clients fill at most half of
// MaxTotalBytes, then their messages are dropped (ErrMemoryBudgetExceeded)
// while a client holding nothing still gets its message; the total returns
// to 0 when sessions are acknowledged, cleared and taken over.
func TestMemoryBudget(t *testing.T) {
	s := newServer()
	s.Options.Capabilities.MaximumInflight = 1000
	s.Options.Memory.MaxTotalBytes = 100 << 10
	h := new(bytesHook)
	require.NoError(t, s.AddHook(h, nil))
	var stuck []*Client
	for _, id := range []string{"a", "b", "c"} {
		stuck = append(stuck, stuckClient(t, s, id, "t/"+id, 1))
	}
	const size = 10 << 10
	for i := 0; i < 10; i++ {
		for _, id := range []string{"a", "b", "c"} {
			s.publishToSubscribers(bigPublish("t/"+id, 1, size))
		}
	}
	require.LessOrEqual(t, s.Mem.Queued.Load(), int64(50<<10+size), "stuck clients use half the budget")
	require.Positive(t, h.count(ErrMemoryBudgetExceeded))

	healthy := stuckClient(t, s, "healthy", "t/h", 1)
	s.publishToSubscribers(bigPublish("t/h", 1, size))
	require.Equal(t, 1, healthy.State.Inflight.Len(), "a client holding nothing is served from the other half")

	var sum int64
	s.Clients.Range(func(_ string, cl *Client) bool { sum += cl.HeldBytes(); return true })
	require.Equal(t, sum, s.Mem.Queued.Load())

	// Takeover (clone + clear), clear, ack: back to 0.
	next := s.NewClient(nil, "t", "a", false)
	next.Properties.ProtocolVersion = 4
	require.True(t, s.inheritClientSession(packets.Packet{}, next))
	require.Equal(t, sum, s.Mem.Queued.Load(), "a takeover moves the bytes")
	next.ClearInflights()
	stuck[1].ClearInflights()
	for _, pk := range stuck[2].State.Inflight.GetAll(false) {
		require.NoError(t, s.processPuback(stuck[2], packets.Packet{PacketID: pk.PacketID}))
	}
	healthy.ClearInflights()
	require.Zero(t, s.Mem.Queued.Load())
}

// stalledBody starts reading a packet on a pipe whose other end sends a
// fixed header declaring declared bytes, then sent bytes of body, then
// nothing, on a client with keepalive 0. It returns a channel with
// ReadPacket's error.
func stalledBody(t *testing.T, s *Server, typ byte, declared, sent int) chan error {
	t.Helper()
	r, w := net.Pipe()
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	cl := s.NewClient(r, "t", "", false)
	cl.State.Keepalive = 0 // no keepalive deadline: only the read bounds apply
	done := make(chan error, 1)
	go func() {
		fh := new(packets.FixedHeader)
		if err := cl.ReadFixedHeader(fh); err != nil {
			done <- err
			return
		}
		_, err := cl.ReadPacket(fh)
		done <- err
	}()
	var hdr bytes.Buffer
	hdr.WriteByte(typ << 4)
	encodeLen(&hdr, declared)
	go func() { _, _ = w.Write(append(hdr.Bytes(), make([]byte, sent)...)) }()
	return done
}

// TestReadBodyGrowsAsBytesArrive (patch 42): 40 connections that each
// declare a 1 MiB PUBLISH and send 8 KiB of it hold about what they sent,
// not what they declared: v2.7.9 allocated the declared 1 MiB (40 MiB in
// all) before reading, measured here as heap in use.
func TestReadBodyGrowsAsBytesArrive(t *testing.T) {
	s := newServer()
	s.Options.Capabilities.MaximumPacketSize = 2 << 20
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const conns = 40
	for i := 0; i < conns; i++ {
		stalledBody(t, s, packets.Publish, 1<<20, 8<<10)
	}
	waitFor(t, "bodies being read", func() bool { return s.Mem.Reading.Load() == conns*8<<10 })
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("heap in use grew %d KiB for %d stalled 1 MiB bodies", grew>>10, conns)
	require.Less(t, grew, int64(conns*256<<10), "stalled bodies hold what was sent, not what was declared")
}

// TestReadBudget (patch 42): a body that would take the bytes being read
// above MaxReadingBytes ends the read with 0x97; the bytes counted while it
// was read are released.
func TestReadBudget(t *testing.T) {
	s := newServer()
	s.Options.Memory.MaxReadingBytes = 100 << 10
	first := stalledBody(t, s, packets.Publish, 1<<20, 60<<10)
	waitFor(t, "first body counted", func() bool { return s.Mem.Reading.Load() == 64<<10 })
	second := stalledBody(t, s, packets.Publish, 1<<20, 60<<10)
	select {
	case err := <-second:
		require.ErrorIs(t, err, packets.ErrQuotaExceeded)
	case err := <-first:
		t.Fatalf("first read ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("a read beyond the budget was not refused")
	}
	require.Equal(t, int64(64<<10), s.Mem.Reading.Load(), "the refused read released its bytes")
	require.Equal(t, int64(1), s.Mem.ReadRefused.Load())
}

// TestReadTimeoutBoundsSlowBody (patch 43): with keepalive 0 (no deadline
// on an idle connection) a body that stops arriving ends the connection
// after ReadTimeout; v2.7.9 waited forever.
func TestReadTimeoutBoundsSlowBody(t *testing.T) {
	s := newServer()
	s.Options.Memory.ReadTimeout = 200 * time.Millisecond
	done := stalledBody(t, s, packets.Publish, 100<<10, 10<<10)
	select {
	case err := <-done:
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	case <-time.After(10 * time.Second):
		t.Fatal("a stalled body was held past ReadTimeout")
	}
	require.Zero(t, s.Mem.Reading.Load())
}

// TestConnectBounds (patch 44): a CONNECT larger than MaxConnectSize is
// refused before its body is read, and a connection that sends no CONNECT
// (or part of one) is closed after ConnectTimeout; v2.7.9 read (and
// allocated) the CONNECT up to MaximumPacketSize and waited forever.
func TestConnectBounds(t *testing.T) {
	s := newServer()
	s.Options.Memory.MaxConnectSize = 1024
	s.Options.Memory.ConnectTimeout = 300 * time.Millisecond

	var hdr bytes.Buffer
	hdr.WriteByte(packets.Connect << 4)
	encodeLen(&hdr, 2000)
	err := establish(t, s, hdr.Bytes())
	require.ErrorIs(t, err, packets.ErrPacketTooLarge)
	require.Equal(t, int64(1), s.Mem.ConnectTooLarge.Load())

	for _, raw := range [][]byte{nil, {packets.Connect << 4, 100, 0, 4}} {
		start := time.Now()
		err := establish(t, s, raw)
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		require.Less(t, time.Since(start), 5*time.Second)
	}

	// A valid CONNECT within the bounds still connects.
	r, w := net.Pipe()
	defer w.Close()
	go func() { _ = s.EstablishConnection("tcp", r) }()
	_, err = w.Write(packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes)
	require.NoError(t, err)
	_ = w.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 4)
	_, err = io.ReadFull(w, b)
	require.NoError(t, err)
	require.Equal(t, []byte{packets.Connack << 4, 2, 0, 0}, b)
}

// encodeLen writes n as an MQTT variable byte integer.
func encodeLen(b *bytes.Buffer, n int) {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b.WriteByte(c)
		if n == 0 {
			return
		}
	}
}

// chunkReader returns data in chunks whose sizes come from sizes (cycled),
// then err.
type chunkReader struct {
	data  []byte
	sizes []byte
	i     int
	err   error
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, c.err
	}
	n := len(c.data)
	if len(c.sizes) > 0 {
		n = int(c.sizes[c.i%len(c.sizes)])*97 + 1
		c.i++
	}
	n = min(n, len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

// FuzzReadBody (patch 42): the incremental reader returns exactly what
// io.ReadFull of the declared length returns (the bytes, or an error when
// the stream ends early), whatever the chunking, never holds a buffer above
// twice what arrived (beyond readInitial), and releases every byte it
// counted.
func FuzzReadBody(f *testing.F) {
	f.Add([]byte("hello"), []byte{1}, uint16(5), false)
	f.Add(bytes.Repeat([]byte{7}, 20000), []byte{3, 200, 0}, uint16(20000), false)
	f.Add(bytes.Repeat([]byte{7}, 9000), []byte{255}, uint16(12000), false)
	f.Add(bytes.Repeat([]byte{1}, 5000), []byte{0}, uint16(4097), true)
	f.Fuzz(func(t *testing.T, data, sizes []byte, declared uint16, budget bool) {
		s := newServer()
		if budget {
			s.Options.Memory.MaxReadingBytes = 16 << 10
		}
		cl := s.NewClient(nil, "t", "", false)
		cl.Net.bconn = newConnReader(&chunkReader{data: data, sizes: sizes, err: io.EOF}, 16)
		got, err := cl.readBody(int(declared))

		want := make([]byte, declared)
		_, wantErr := io.ReadFull(bytes.NewReader(data), want)
		switch {
		case budget && errors.Is(err, ErrReadBudgetExceeded):
			require.Greater(t, int(declared), 16<<10, "refused below the budget")
		case wantErr != nil:
			require.Error(t, err)
		default:
			require.NoError(t, err)
			require.Equal(t, want, got)
			if int(declared) > readInitial {
				require.LessOrEqual(t, cap(got), max(2*len(got), readInitial))
			}
		}
		require.Zero(t, s.Mem.Reading.Load(), "every counted byte released")
	})
}

// TestReadBudgetConnect (patch 42): CONNECT bodies, sent before any
// authentication, may use a quarter of MaxReadingBytes only: a stranger
// cannot use up the budget of authenticated clients' large packets.
func TestReadBudgetConnect(t *testing.T) {
	s := newServer()
	s.Options.Memory.MaxReadingBytes = 256 << 10 // CONNECTs: 64 KiB
	s.Options.Memory.ConnectTimeout = time.Minute
	connect := func(sent int) chan error {
		r, w := net.Pipe()
		t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
		done := make(chan error, 1)
		go func() { done <- s.EstablishConnection("tcp", r) }()
		var hdr bytes.Buffer
		hdr.WriteByte(packets.Connect << 4)
		encodeLen(&hdr, 60<<10)
		go func() { _, _ = w.Write(append(hdr.Bytes(), make([]byte, sent)...)) }()
		return done
	}
	first := connect(40 << 10)
	waitFor(t, "the first CONNECT counted", func() bool { return s.Mem.ReadingConnect.Load() == 60<<10 })
	second := connect(40 << 10)
	select {
	case err := <-second:
		require.ErrorIs(t, err, packets.ErrQuotaExceeded)
	case err := <-first:
		t.Fatalf("first CONNECT ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("a CONNECT beyond a quarter of the budget was not refused")
	}
	// An authenticated client's large body still fits the rest.
	publish := stalledBody(t, s, packets.Publish, 1<<20, 100<<10)
	waitFor(t, "the PUBLISH counted", func() bool { return s.Mem.Reading.Load() == 60<<10+128<<10 })
	select {
	case err := <-publish:
		t.Fatalf("PUBLISH read ended: %v", err)
	default:
	}
	require.Equal(t, int64(60<<10), s.Mem.ReadingConnect.Load())
}

// TestExpiredSessionReleasesBytes (patch 41): a session that expires gives
// back what it held (its bytes in the node's total, its in-flight count, its
// subscriptions) without any hook's help; the total would otherwise leak
// until MaxTotalBytes refused every delivery.
func TestExpiredSessionReleasesBytes(t *testing.T) {
	s := newServer()
	s.Options.Capabilities.MaximumInflight = 1000
	s.Options.Capabilities.MaximumSessionExpiryInterval = 1
	cl := stuckClient(t, s, "gone", "t/g", 1)
	for i := 0; i < 3; i++ {
		s.publishToSubscribers(bigPublish("t/g", 1, 10<<10))
	}
	require.Positive(t, s.Mem.Queued.Load())
	cl.Stop(packets.ErrServerShuttingDown) // offline: the session stays until it expires
	s.clearExpiredClients(time.Now().Unix() + 10)
	_, held := s.Clients.Get("gone")
	require.False(t, held, "expired")
	require.Zero(t, s.Mem.Queued.Load(), "bytes of the expired session released")
	require.Zero(t, atomic.LoadInt64(&s.Info.Inflight), "in-flight count released")
	require.Empty(t, s.Topics.Subscribers("t/g").Subscriptions, "subscriptions removed")
}
