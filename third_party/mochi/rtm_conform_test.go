// SPDX-License-Identifier: MIT
// rtm patch: regression tests for rtm's patches 30-36 (conformance found by
// the Eclipse Paho interoperability suites), see PATCHES.md.

package mqtt

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// topicACLHook allows every subscription and every publish except to an
// empty topic and under secret/, as rtm's ACL does.
type topicACLHook struct{ HookBase }

func (h *topicACLHook) ID() string { return "topic-acl" }
func (h *topicACLHook) Provides(b byte) bool {
	return bytes.Contains([]byte{OnConnectAuthenticate, OnACLCheck}, []byte{b})
}
func (h *topicACLHook) OnConnectAuthenticate(*Client, packets.Packet) bool { return true }
func (h *topicACLHook) OnACLCheck(_ *Client, topic string, write bool) bool {
	return !write || topic != "" && !strings.HasPrefix(topic, "secret/")
}

// TestInboundTopicAliasResolvedBeforeACL (patch 30): a PUBLISH that names
// its topic by alias only is checked and delivered as the topic the alias
// stands for; an alias of a denied topic stays denied; an alias the client
// never set is a protocol error. On v2.7.9 the ACL saw the empty topic name,
// so every alias-only PUBLISH was refused (0x87), and an unset alias was
// published on the empty topic.
func TestInboundTopicAliasResolvedBeforeACL(t *testing.T) {
	cc := NewDefaultServerCapabilities()
	cc.MaximumMessageExpiryInterval = 0
	s := New(&Options{Logger: logger, Capabilities: cc})
	require.NoError(t, s.AddHook(new(topicACLHook), nil))

	sub := s.NewClient(nil, "t", "offline-sub", false)
	sub.Properties.ProtocolVersion = 5
	s.Clients.Add(sub)
	s.Topics.Subscribe(sub.ID, packets.Subscription{Filter: "#", Qos: 1})
	sub.State.Subscriptions.Add("#", packets.Subscription{Filter: "#", Qos: 1})

	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	pub := s.NewClient(w, "t", "publisher", false)
	pub.Properties.ProtocolVersion = 5
	pub.State.Inflight.ResetReceiveQuota(10)

	publish := func(id uint16, topic string, alias uint16) (hdr byte, body []byte) {
		t.Helper()
		done := make(chan error, 1)
		go func() {
			done <- s.processPacket(pub, packets.Packet{
				FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: 1},
				TopicName:       topic,
				Payload:         []byte("x"),
				PacketID:        id,
				ProtocolVersion: 5,
				Properties:      packets.Properties{TopicAlias: alias, TopicAliasFlag: true},
			})
		}()
		hdr, body, err := readRawPacket(r)
		require.NoError(t, err)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("processPacket did not return")
		}
		return hdr, body
	}
	reason := func(body []byte) byte {
		if len(body) < 3 {
			return 0 // no reason code: success
		}
		return body[2]
	}

	hdr, body := publish(1, "a/b", 1)
	require.Equal(t, packets.Puback, hdr>>4)
	require.Equal(t, byte(0), reason(body), "topic name and alias")

	hdr, body = publish(2, "", 1)
	require.Equal(t, packets.Puback, hdr>>4)
	require.Equal(t, byte(0), reason(body), "alias only")
	require.Equal(t, 2, sub.State.Inflight.Len(), "messages for the subscriber")
	for _, m := range sub.State.Inflight.GetAll(false) {
		require.Equal(t, "a/b", m.TopicName)
	}

	hdr, body = publish(3, "secret/x", 2)
	require.Equal(t, packets.Puback, hdr>>4)
	require.Equal(t, packets.ErrNotAuthorized.Code, reason(body), "denied topic with alias")
	hdr, body = publish(4, "", 2)
	require.Equal(t, packets.Puback, hdr>>4)
	require.Equal(t, packets.ErrNotAuthorized.Code, reason(body), "alias of a denied topic")
	require.Equal(t, 2, sub.State.Inflight.Len(), "messages for the subscriber")

	hdr, body = publish(5, "", 3)
	require.Equal(t, packets.Disconnect, hdr>>4, "alias never set")
	require.Equal(t, packets.ErrProtocolViolationNoTopic.Code, body[0])
	_, _ = io.Copy(io.Discard, r)
}

// dropCountHook counts OnPublishDropped calls and the Mods.MaxSize they see.
type dropCountHook struct {
	HookBase
	dropped chan packets.Packet
}

func (h *dropCountHook) ID() string { return "drop-count" }
func (h *dropCountHook) Provides(b byte) bool {
	return bytes.Contains([]byte{OnPublishDropped}, []byte{b})
}
func (h *dropCountHook) OnPublishDropped(_ *Client, pk packets.Packet) { h.dropped <- pk }

// TestPacketTooLargeForSubscriberIsSkipped (patch 31): a QoS 1 message
// larger than the subscriber's Maximum Packet Size is not sent to it, the
// subscriber's session behaves as if it had been delivered (no send quota
// held, nothing to resend), the drop is reported, and the publisher (here
// the subscriber itself, as in Paho's test_maximum_packet_size) gets its
// PUBACK. On v2.7.9 the message stayed in the session holding the only unit
// of send quota, so every later message waited forever.
func TestPacketTooLargeForSubscriberIsSkipped(t *testing.T) {
	s := newServer()
	drops := &dropCountHook{dropped: make(chan packets.Packet, 10)}
	require.NoError(t, s.AddHook(drops, nil))

	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl := s.NewClient(w, "t", "small", false)
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.MaximumPacketSize = 64
	cl.State.Inflight.ResetReceiveQuota(10)
	cl.State.Inflight.maximumSendQuota = 1 // Receive Maximum 1
	cl.State.Inflight.ResetSendQuota(1)
	s.Clients.Add(cl)
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/b", Qos: 1})
	cl.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})

	packetsRead := make(chan [2][]byte, 100)
	go func() {
		for {
			hdr, body, err := readRawPacket(r)
			if err != nil {
				close(packetsRead)
				return
			}
			packetsRead <- [2][]byte{{hdr}, body}
		}
	}()
	next := func() (byte, []byte) {
		t.Helper()
		select {
		case p, ok := <-packetsRead:
			require.True(t, ok, "connection closed")
			return p[0][0] >> 4, p[1]
		case <-time.After(5 * time.Second):
			t.Fatal("no packet within 5s")
			return 0, nil
		}
	}
	publish := func(id uint16, payload []byte) {
		t.Helper()
		require.NoError(t, s.processPacket(cl, packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:       "a/b",
			Payload:         payload,
			PacketID:        id,
			ProtocolVersion: 5,
		}))
	}

	for id := uint16(1); id <= 3; id++ {
		publish(id, bytes.Repeat([]byte("."), 64))
		typ, body := next()
		require.Equal(t, packets.Puback, typ, "message %d: the publisher's PUBACK (and no PUBLISH)", id)
		require.Equal(t, id, uint16(body[0])<<8|uint16(body[1]))
		select {
		case pk := <-drops.dropped:
			require.Equal(t, uint32(64), pk.Mods.MaxSize)
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d: drop not reported", id)
		}
		require.Eventually(t, func() bool { return cl.State.Inflight.Len() == 0 }, 5*time.Second, time.Millisecond,
			"message %d: still in the session", id)
	}

	publish(4, []byte("small"))
	var gotPublish, gotAck bool
	for !gotPublish || !gotAck {
		typ, body := next()
		switch typ {
		case packets.Publish:
			require.Contains(t, string(body), "small")
			gotPublish = true
		case packets.Puback:
			gotAck = true
		default:
			t.Fatalf("unexpected packet type %d", typ)
		}
	}
}

// TestDisconnectHalfClosesAndDrains (patch 32): a DISCONNECT refusing the
// client's packets (here 0x93, receive maximum exceeded) reaches a client
// that still has unread bytes in the server's socket and keeps sending: the
// server half-closes and drains, so the client's writes succeed and it reads
// the DISCONNECT, then EOF. On v2.7.9 the server closed at once with unread
// data, its kernel sent a TCP reset, and the client's next write failed
// (EPIPE or ECONNRESET) before it could read the DISCONNECT.
func TestDisconnectHalfClosesAndDrains(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	var server net.Conn
	select {
	case server = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("no connection accepted")
	}

	s := newServer()
	cl := s.NewClient(server, "t", "flood", false)
	cl.Properties.ProtocolVersion = 5

	// What the client sent and the server did not read (the packets past
	// its Receive Maximum), then more while the DISCONNECT is on its way.
	_, err = client.Write(bytes.Repeat([]byte{0x62, 0x02, 0x00, 0x01}, 4096)) // PUBRELs
	require.NoError(t, err)
	require.Eventually(t, func() bool { return cl.Net.Conn != nil }, time.Second, time.Millisecond)
	require.Error(t, s.DisconnectClient(cl, packets.ErrReceiveMaximum))
	for i := 0; i < 100; i++ { // the client keeps sending, one packet at a time
		_, err := client.Write([]byte{0x62, 0x02, 0x00, byte(i)})
		require.NoError(t, err, "write %d after the DISCONNECT", i)
	}

	hdr, body, err := readRawPacket(client)
	require.NoError(t, err, "reading the DISCONNECT")
	require.Equal(t, packets.Disconnect, hdr>>4)
	require.Equal(t, packets.ErrReceiveMaximum.Code, body[0])
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = client.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "after the DISCONNECT: a half-close, not a reset")
}

// TestConnackAdvertisesTopicAliasMaximum (patch 33): a successful v5
// CONNACK carries the Topic Alias Maximum the server accepts. v2.7.9 left
// it out, which tells the client 0: no topic aliases.
func TestConnackAdvertisesTopicAliasMaximum(t *testing.T) {
	s := newServer()
	s.Options.Capabilities.TopicAliasMaximum = 64
	cl, r, w := newTestClient()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl.Properties.ProtocolVersion = 5
	done := make(chan error, 1)
	go func() { done <- s.SendConnack(cl, packets.CodeSuccess, false, nil) }()
	hdr, body, err := readRawPacket(r)
	require.NoError(t, err)
	require.NoError(t, <-done)
	require.Equal(t, packets.Connack, hdr>>4)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack, Remaining: len(body)}, ProtocolVersion: 5}
	require.NoError(t, pk.ConnackDecode(body))
	require.Equal(t, uint16(64), pk.Properties.TopicAliasMaximum)
}

// TestResendSkipsPacketTooLarge (patch 31): a message queued for a session
// while its client was away, larger than the Maximum Packet Size the client
// now connects with, is dropped (reported) when the session is resent, and
// the messages after it are still sent; the resend does not fail, which
// failed the reconnect.
func TestResendSkipsPacketTooLarge(t *testing.T) {
	s := newServer()
	drops := &dropCountHook{dropped: make(chan packets.Packet, 10)}
	require.NoError(t, s.AddHook(drops, nil))
	r, w := net.Pipe()
	defer func() { _ = r.Close(); _ = w.Close() }()
	cl := s.NewClient(w, "t", "small", false)
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.MaximumPacketSize = 64
	for i, size := range []int{10, 500, 20} { // in this order: resent in the order queued
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName: "a/b", PacketID: uint16(i + 1), Payload: make([]byte, size)})
	}
	got := make(chan uint16, 10)
	go func() {
		for {
			hdr, body, err := readRawPacket(r)
			if err != nil {
				close(got)
				return
			}
			if hdr>>4 == packets.Publish {
				got <- binary.BigEndian.Uint16(body[2+len("a/b"):])
			}
		}
	}()
	require.NoError(t, cl.ResendInflightMessages(true))
	for _, want := range []uint16{1, 3} {
		select {
		case id := <-got:
			require.Equal(t, want, id)
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d not resent", want)
		}
	}
	require.Equal(t, uint16(2), (<-drops.dropped).PacketID)
	_, held := cl.State.Inflight.Get(2)
	require.False(t, held, "the dropped message left the session")
}
