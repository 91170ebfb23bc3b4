package mqtt

import (
	"errors"
	"io"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestRv12FailedHeldPubrecForgotten (review rv12, patch 54): a QoS 2
// PUBLISH whose held PUBREC fails (rtm: not made durable, a peer's link
// lost the message, the peer's wait timed out) closes the connection
// without the PUBREC, so that the client publishes again. But the
// inbound QoS 2 state (the PUBREC) is kept: the session's next connection
// is sent that PUBREC (resendInflight) and the client's DUP resend of the
// PUBLISH is answered from it (inboundIDInUse) without being published
// again. The client completes the flow with PUBREL/PUBCOMP and drops a
// message that was never made safe. A QoS 1 one does not have the problem:
// releaseAcks forgets its PUBACK.
func TestRv12FailedHeldPubrecForgotten(t *testing.T) {
	s := newServer()
	h := &holdHook{release: make(chan struct{}), err: errors.New("a peer's link lost it")}
	close(h.release)
	require.NoError(t, s.AddHook(h, nil))
	cl, r, _ := newTestClient()
	cl.ID = "pub"
	cl.Properties.ProtocolVersion = 4
	cl.Properties.Clean = false // a persistent session
	s.Clients.Add(cl)
	go func() { _, _ = io.Copy(io.Discard, r) }()
	pk := holdPublish(1, "hold")
	pk.FixedHeader.Qos = 2
	require.NoError(t, s.processPublish(cl, pk))
	require.Eventually(t, cl.Closed, 5*time.Second, time.Millisecond)

	// The client reconnects, session present.
	cl2, r2, _ := newTestClient()
	cl2.ID = "pub"
	cl2.Properties.ProtocolVersion = 4
	go func() { _, _ = io.Copy(io.Discard, r2) }()
	require.True(t, s.inheritClientSession(packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: "pub"}}, cl2))
	for _, p := range cl2.inboundPending() {
		require.NotEqual(t, packets.Pubrec, p.FixedHeader.Type,
			"the new connection is sent the PUBREC of PUBLISH %d, whose acknowledgement failed: the client completes the flow and drops it", p.PacketID)
	}
	require.False(t, cl2.inboundHas(1), "a resent PUBLISH 1 (DUP) would be answered PUBREC without being published again")
}

// TestRv12TakeoverDoesNotSendHeldPuback (review rv12, patches 54 and 94):
// a QoS 1 PUBLISH's PUBACK waits for its hold (rtm: the store write, the
// peers' link acknowledgements). Its inbound entry (the PUBACK) is set
// before the hold, and a session takeover meanwhile (the client
// reconnected, clean session false) clones it into the new connection,
// which resendInflight sends it at once: the client is told the message is
// safe before the hold said so, and the old connection's wait then fails
// (publisher gone) without anyone noticing. The same goes for a QoS 2
// PUBREC.
func TestRv12TakeoverDoesNotSendHeldPuback(t *testing.T) {
	s := newServer()
	h := &holdHook{release: make(chan struct{}), err: errors.New("publisher gone")}
	defer close(h.release)
	require.NoError(t, s.AddHook(h, nil))
	cl, r, _ := newTestClient()
	cl.ID = "pub"
	cl.Properties.ProtocolVersion = 4
	cl.Properties.Clean = false
	s.Clients.Add(cl)
	go func() { _, _ = io.Copy(io.Discard, r) }()
	require.NoError(t, s.processPublish(cl, holdPublish(1, "hold")))

	cl2, r2, w2 := newTestClient()
	defer func() { _ = w2.Close(); _ = r2.Close() }()
	cl2.ID = "pub"
	cl2.Properties.ProtocolVersion = 4
	require.True(t, s.inheritClientSession(packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: "pub"}}, cl2))
	acks := make(chan uint16, 1)
	go readAcks(t, r2, 1, acks)
	go func() { _ = cl2.ResendInflightMessages(true) }()
	select {
	case id, ok := <-acks:
		if ok {
			t.Fatalf("the new connection got PUBACK %d while its PUBLISH's acknowledgement is still held", id)
		}
	case <-time.After(300 * time.Millisecond):
	}
}

// TestRv12OutboundQos2DoesNotTakeReceiveQuota (review rv12, patch 122):
// Receive Maximum limits the QoS 1/2 PUBLISHes the client sent and the
// server has not acknowledged [MQTT-3.3.4-9]. v2.7.9's processPubrec takes
// a unit of the same receive quota for each of the server's own QoS 2
// messages the client acknowledged with PUBREC (given back at PUBCOMP):
// a client that has that many outbound QoS 2 messages at their PUBREL
// step is disconnected 0x93 at its first QoS 1 PUBLISH, which it was
// entitled to send.
func TestRv12OutboundQos2DoesNotTakeReceiveQuota(t *testing.T) {
	s := newServer()
	_ = s.Serve()
	defer s.Close()
	cl, r, _ := newTestClient()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetReceiveQuota(2)
	s.Clients.Add(cl)
	for id := uint16(1); id <= 2; id++ { // two outbound QoS 2 messages, PUBREC'd
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: id, TopicName: "a/b"})
		require.NoError(t, s.processPubrec(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: id}))
	}
	pk := holdPublish(1, "free") // the client's first PUBLISH
	require.NoError(t, s.processPacket(cl, pk), "a QoS 1 PUBLISH with no other inbound QoS 1/2 PUBLISH unacknowledged refused")
}

// TestRv12RefusedPubrecReturnsSendQuota (review rv12, flow control): MQTT
// 5 section 4.9: the send quota is incremented "each time a PUBREC packet
// is received with a Return Code of 0x80 or greater". processPubrec's
// refusal branch ends the flow without it: each QoS 2 message a client
// refuses takes one unit of its Receive Maximum for the rest of the
// connection, and once they are all gone nothing more is sent to it (the
// messages wait, Expiry -1, until it reconnects).
func TestRv12RefusedPubrecReturnsSendQuota(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetSendQuota(1)
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 7, TopicName: "a/b"})
	require.True(t, cl.State.Inflight.TakeSendQuota()) // sent
	require.NoError(t, s.processPubrec(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: 7, ReasonCode: packets.ErrUnspecifiedError.Code}))
	_, ok := cl.State.Inflight.Get(7)
	require.False(t, ok, "the refused message's flow ended")
	require.True(t, cl.State.Inflight.TakeSendQuota(), "the refused QoS 2 message's send quota was not given back")
}

// TestRv12AdoptSessionMergeKeepsMovedMessages (review rv12, patch 121):
// AdoptSession merges into a session the server holds for id already (a
// move that failed restored at its source after a newer connection of the
// client started a session there, a claim's adoption). That session's
// messages have packet ids of their own counter, and a moved message whose
// id is among them is skipped as present: lost, and no hook told. Patch
// 121's order (queue before subscriptions) does not help there: the
// subscriptions are live already.
func TestRv12AdoptSessionMergeKeepsMovedMessages(t *testing.T) {
	s := newServer()
	s.AdoptSession("dev", 5, Session{
		Subscriptions: []packets.Subscription{{Filter: "in/dev", Qos: 1}},
		Inflight: []packets.Packet{{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			PacketID: 1, TopicName: "in/dev", Payload: []byte("here")}},
		PacketID: 1,
	})
	s.AdoptSession("dev", 5, Session{
		Subscriptions: []packets.Subscription{{Filter: "in/dev", Qos: 1}},
		Inflight: []packets.Packet{{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			PacketID: 1, TopicName: "in/dev", Payload: []byte("moved")}},
		PacketID: 1,
	})
	cl, ok := s.Clients.Get("dev")
	require.True(t, ok)
	var got []string
	for _, pk := range cl.State.Inflight.GetAll(false) {
		got = append(got, string(pk.Payload))
	}
	require.Contains(t, got, "moved", "the moved message with the packet id of one the session held is dropped")
}

// TestRv12InboundPubrelKeepsSendQuota (review rv12, flow control): the
// send quota counts the server's own unacknowledged QoS 1/2 PUBLISHes,
// up to the client's Receive Maximum [MQTT-4.9.0-1]. v2.7.9's
// processPubrel, which completes a QoS 2 PUBLISH the client sent, also
// increments it: a client that publishes at QoS 2 while its Receive
// Maximum of messages from the server are unacknowledged gets one more
// than it allowed, which it may treat as a protocol error (DISCONNECT
// 0x93).
func TestRv12InboundPubrelKeepsSendQuota(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetSendQuota(1)
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 3, TopicName: "a/b"})
	require.True(t, cl.State.Inflight.TakeSendQuota())                                                       // the server's message 3 is out, unacknowledged
	cl.inboundQos().Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: 9}) // the client's QoS 2 PUBLISH 9
	require.NoError(t, s.processPubrel(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 9}))
	require.False(t, cl.State.Inflight.TakeSendQuota(), "the client's PUBREL gave the server a send quota its Receive Maximum does not allow")
}
