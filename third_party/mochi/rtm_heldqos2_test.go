// SPDX-License-Identifier: MIT
// rtm patch 123: see PATCHES.md.

package mqtt

import (
	"bufio"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// qos2HoldHook holds the acknowledgement of every QoS 1/2 PUBLISH to "up":
// each hold takes its result from results. It counts the messages to "up"
// that were published.
type qos2HoldHook struct {
	HookBase
	results   chan error
	published atomic.Int32
}

func (h *qos2HoldHook) ID() string { return "qos2hold" }
func (h *qos2HoldHook) Provides(b byte) bool {
	return b == OnPublishHold || b == OnPublished
}
func (h *qos2HoldHook) OnPublishHold(_ *Client, pk packets.Packet) func() error {
	if pk.TopicName != "up" {
		return nil
	}
	return func() error { return <-h.results }
}
func (h *qos2HoldHook) OnPublished(_ *Client, pk packets.Packet) {
	if pk.TopicName == "up" {
		h.published.Add(1)
	}
}

func newQos2HoldServer(t *testing.T) (*Server, *qos2HoldHook) {
	cc := NewDefaultServerCapabilities()
	cc.MaximumMessageExpiryInterval = 0
	s := New(&Options{Logger: logger, Capabilities: cc})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	h := &qos2HoldHook{results: make(chan error, 4)}
	require.NoError(t, s.AddHook(h, nil))
	t.Cleanup(func() { _ = s.Close() })
	return s, h
}

// qos2Conn is a v5 client with a persistent session; its packets are read
// by a goroutine into got (closed when the connection ends).
type qos2Conn struct {
	cli  net.Conn
	got  chan packets.Packet
	done chan error
}

func qos2Connect(t *testing.T, s *Server, id string) *qos2Conn {
	t.Helper()
	cli, r, done := rtmPipeConnect(t, s, id)
	c := &qos2Conn{cli: cli, got: make(chan packets.Packet, 16), done: done}
	go c.read(r)
	pk := c.next(t)
	require.Equal(t, packets.Connack, pk.FixedHeader.Type)
	t.Cleanup(func() { _ = cli.Close() })
	return c
}

func (c *qos2Conn) read(r *bufio.Reader) {
	defer close(c.got)
	for {
		b0, err := r.ReadByte()
		if err != nil {
			return
		}
		var pk packets.Packet
		_ = pk.FixedHeader.Decode(b0)
		n, _, err := packets.DecodeLength(r)
		if err != nil {
			return
		}
		pk.FixedHeader.Remaining = n
		pk.ProtocolVersion = 5
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return
		}
		switch pk.FixedHeader.Type {
		case packets.Puback:
			_ = pk.PubackDecode(body)
		case packets.Pubrec:
			_ = pk.PubrecDecode(body)
		case packets.Pubcomp:
			_ = pk.PubcompDecode(body)
		case packets.Disconnect:
			continue
		}
		c.got <- pk
	}
}

// next returns the next packet the client receives (failing after 5 s).
func (c *qos2Conn) next(t *testing.T) packets.Packet {
	t.Helper()
	select {
	case pk, ok := <-c.got:
		require.True(t, ok, "connection closed")
		return pk
	case <-time.After(5 * time.Second):
		t.Fatal("nothing received in 5 s")
	}
	return packets.Packet{}
}

// none checks that nothing is received within d.
func (c *qos2Conn) none(t *testing.T, d time.Duration, what string) {
	t.Helper()
	select {
	case pk, ok := <-c.got:
		if ok {
			t.Fatalf("%s: received %s id %d reason 0x%x", what, packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.ReasonCode)
		}
	case <-time.After(d):
	}
}

// closed waits until the server closed the connection, checking that it
// sent nothing.
func (c *qos2Conn) closed(t *testing.T, what string) {
	t.Helper()
	select {
	case pk, ok := <-c.got:
		require.False(t, ok, "%s: received %s id %d", what, packets.PacketNames[pk.FixedHeader.Type], pk.PacketID)
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: connection not closed in 5 s", what)
	}
}

func qos2Publish(t *testing.T, c *qos2Conn, id uint16, dup bool) {
	t.Helper()
	rtmWrite(t, c.cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2, Dup: dup},
		TopicName: "up", PacketID: id, Payload: []byte("m")})
}

// qos2Complete expects the PUBREC (success) of id, sends the PUBREL and
// expects the PUBCOMP.
func qos2Complete(t *testing.T, c *qos2Conn, id uint16) {
	t.Helper()
	pk := c.next(t)
	require.Equal(t, packets.Pubrec, pk.FixedHeader.Type)
	require.Equal(t, id, pk.PacketID)
	require.Less(t, pk.ReasonCode, byte(0x80), "PUBREC reason 0x%x", pk.ReasonCode)
	rtmWrite(t, c.cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: id})
	pk = c.next(t)
	require.Equal(t, packets.Pubcomp, pk.FixedHeader.Type)
	require.Equal(t, id, pk.PacketID)
}

// TestHeldPubrecFailedIsNotOwed (patch 123): a QoS 2 PUBLISH whose held
// PUBREC failed (the connection closed without it) is not acknowledged
// from the session when the client reconnects: no PUBREC is resent, and
// the PUBLISH sent again (DUP) is published again and held again; its
// PUBREC comes once that hold succeeded. Before the patch the reconnect
// resent the PUBREC at once (and the resent PUBLISH got another),
// though the message's hold had failed (in rtm: a peer never got it).
func TestHeldPubrecFailedIsNotOwed(t *testing.T) {
	s, h := newQos2HoldServer(t)
	c := qos2Connect(t, s, "dev")
	qos2Publish(t, c, 5, false)
	h.results <- errors.New("lost on the way")
	c.closed(t, "a failed hold")
	select {
	case <-c.done: // the connection ended
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not end")
	}

	c = qos2Connect(t, s, "dev")
	c.none(t, 200*time.Millisecond, "after the CONNACK, for a PUBLISH never acknowledged")
	qos2Publish(t, c, 5, true)
	c.none(t, 100*time.Millisecond, "while the resent PUBLISH is held")
	require.Eventually(t, func() bool { return h.published.Load() == 2 }, 5*time.Second, time.Millisecond,
		"the resent PUBLISH is published again")
	h.results <- nil
	qos2Complete(t, c, 5)
	require.Equal(t, int32(2), h.published.Load())
}

// TestDupWaitsForHeldPubrec (patch 123): a client that reconnects while
// its QoS 2 PUBLISH's PUBREC is held on the connection it left gets no
// PUBREC resent, and the PUBLISH it sends again (DUP) is answered only
// when the first one's hold is known: a success sends the PUBREC (and the
// message is not published twice); a failure closes the connection
// without it, and the next resend is published as a new message.
func TestDupWaitsForHeldPubrec(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{{"hold-succeeds", nil}, {"hold-fails", errors.New("lost on the way")}} {
		t.Run(tc.name, func(t *testing.T) {
			s, h := newQos2HoldServer(t)
			old := qos2Connect(t, s, "dev")
			qos2Publish(t, old, 7, false)
			require.Eventually(t, func() bool { return h.published.Load() == 1 }, 5*time.Second, time.Millisecond)

			c := qos2Connect(t, s, "dev") // takes the session over while the PUBREC is held
			go func() {
				for range old.got { // the old connection's DISCONNECT, then its end
				}
			}()
			c.none(t, 200*time.Millisecond, "after the CONNACK, while the PUBREC is held")
			qos2Publish(t, c, 7, true)
			c.none(t, 100*time.Millisecond, "while the first PUBLISH's PUBREC is held")
			h.results <- tc.err
			if tc.err == nil {
				qos2Complete(t, c, 7)
				require.Equal(t, int32(1), h.published.Load(), "published once")
				return
			}
			c.closed(t, "the first PUBLISH's hold failed")
			c = qos2Connect(t, s, "dev")
			c.none(t, 100*time.Millisecond, "after the CONNACK, for a PUBLISH never acknowledged")
			qos2Publish(t, c, 7, true)
			require.Eventually(t, func() bool { return h.published.Load() == 2 }, 5*time.Second, time.Millisecond,
				"published again")
			h.results <- nil
			qos2Complete(t, c, 7)
		})
	}
}

// TestHeldPubackNotResent (patch 123): a client that reconnects while its
// QoS 1 PUBLISH's PUBACK is held on the connection it left is not sent
// that PUBACK from the session (v2.7.9 resent every inbound flow): it
// sends the PUBLISH again, which is published again and acknowledged once
// its own hold succeeds.
func TestHeldPubackNotResent(t *testing.T) {
	s, h := newQos2HoldServer(t)
	old := qos2Connect(t, s, "dev")
	rtmWrite(t, old.cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName: "up", PacketID: 3, Payload: []byte("m")})
	require.Eventually(t, func() bool { return h.published.Load() == 1 }, 5*time.Second, time.Millisecond)
	c := qos2Connect(t, s, "dev")
	go func() {
		for range old.got {
		}
	}()
	c.none(t, 200*time.Millisecond, "after the CONNACK, while the PUBACK is held")
	h.results <- errors.New("lost on the way") // the old connection's hold
	rtmWrite(t, c.cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Dup: true},
		TopicName: "up", PacketID: 3, Payload: []byte("m")})
	require.Eventually(t, func() bool { return h.published.Load() == 2 }, 5*time.Second, time.Millisecond)
	h.results <- nil
	pk := c.next(t)
	require.Equal(t, packets.Puback, pk.FixedHeader.Type)
	require.Equal(t, uint16(3), pk.PacketID)
}

// TestDupOfReceivedQos2AnsweredSuccess (patch 123): a QoS 2 PUBLISH sent
// again (DUP) under the packet ID of one the session received and
// acknowledged, whose PUBREL has not come, is answered with a PUBREC of
// success and not published again [MQTT-4.3.3-9]; v2.7.9 answered 0x91
// (packet identifier in use), which tells an MQTT 5 client the message
// failed. Without DUP the answer stays 0x91 (TestPublishIDInUseAnswered).
func TestDupOfReceivedQos2AnsweredSuccess(t *testing.T) {
	s, h := newQos2HoldServer(t)
	c := qos2Connect(t, s, "dev")
	qos2Publish(t, c, 9, false)
	h.results <- nil
	pk := c.next(t)
	require.Equal(t, packets.Pubrec, pk.FixedHeader.Type)
	// OnPublished runs after the hold is queued, maybe after its PUBREC.
	require.Eventually(t, func() bool { return h.published.Load() == 1 }, 5*time.Second, time.Millisecond)
	_ = c.cli.Close()

	c = qos2Connect(t, s, "dev")
	pk = c.next(t) // the PUBREC owed, resent
	require.Equal(t, packets.Pubrec, pk.FixedHeader.Type)
	require.Equal(t, uint16(9), pk.PacketID)
	qos2Publish(t, c, 9, true)
	qos2Complete(t, c, 9)
	require.Equal(t, int32(1), h.published.Load(), "published once")
}
