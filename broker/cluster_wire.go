package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Message types on the node link (package link carries them opaquely;
// types below 16 are the link's own).
const (
	msgRoutes     byte = 16 + iota // full route snapshot of the sender
	msgRouteDelta                  // one route added or removed
	msgPublish                     // a publish for the receiver's subscribers
	msgRetained                    // a retained message set or cleared
	msgClaim                       // "a client with this ID connected to me"
	msgClaimReply                  // the answer, with the session if one moves
	msgMoveStart                   // a session moves to the receiver: its subscriptions; messages follow
	msgMoveChunk                   // messages of a moving session, in order
	msgMoveEnd                     // every message sent (or the move given up)
	msgMoveAck                     // receiver of a move: a chunk arrived (flow control)
	msgMoveDone                    // receiver of a move: session installed, or given up
	msgOwners                      // client IDs the sender holds, and since when (a link's opening)
	msgMoveLate                    // source of a move: a publish for the moved session alone (cluster_relay.go)
	msgMoveRouted                  // receiver of a move: every peer holds its routes for the session now
	msgHeldDone                    // the sender sent on all its held link kept for a failed node (cluster_failover.go)
	msgStaleIDs                    // answer to msgOwners (protoV3): sessions of the receiver that are stale (cluster_heal.go)
)

// Versions of the messages below (the cluster protocol). A broker advertises
// its version in gossip (tag "cp"); a sender uses a message or field only
// if the receiver's version has it, and every decoder ignores what follows
// the fields it knows, so a field added at the end of a message does not
// break a receiver one version behind. Rolling restarts work between
// adjacent versions (docs/clustering.md, "Upgrades").
//
// New fields go at the end of a message; a field after an optional one
// (claimReplyMsg.Busy, publishMsg.HeldOf and Held, moveStartMsg.AdoptedFrom,
// AdoptedAt and Earlier)
// makes the optional one unconditional.
const (
	// protoV1: the releases that advertised no version. Their decoders
	// refuse bytes after the fields they know, and the oldest of them
	// has no packet ID in msgMoveEnd.
	protoV1 = 1
	// protoV2: msgMoveEnd carries the packet ID; decoders ignore
	// trailing fields; the failover marks (publishMsg.Held and HeldOf,
	// moveStartMsg.AdoptedFrom, msgHeldDone: cluster_failover.go), which
	// a protoV1 peer refuses or ignores, so they go only to protoV2 peers
	// (publishMsg.forProto, moveOut, sendHeldDone, brokersDone).
	protoV2 = 2
	// protoV3: msgOwners carries each session's age (ownersMsg.Ages), and
	// of two nodes the one whose name sorts first decides which of their
	// sessions of one client ID is stale, answering msgStaleIDs
	// (cluster_heal.go).
	protoV3 = 3

	clusterProtocol = protoV3
)

// errShort is returned for a message that ends before its fields do.
var errShort = errors.New("cluster message truncated")

// wbuf appends the fields of a cluster message.
type wbuf struct{ b []byte }

func (w *wbuf) uvarint(v uint64) { w.b = binary.AppendUvarint(w.b, v) }
func (w *wbuf) varint(v int64)   { w.b = binary.AppendVarint(w.b, v) }
func (w *wbuf) byte(v byte)      { w.b = append(w.b, v) }
func (w *wbuf) bytes(v []byte)   { w.uvarint(uint64(len(v))); w.b = append(w.b, v...) }
func (w *wbuf) string(v string)  { w.uvarint(uint64(len(v))); w.b = append(w.b, v...) }
func (w *wbuf) bool(v bool) {
	if v {
		w.byte(1)
	} else {
		w.byte(0)
	}
}

// rbuf reads the fields wbuf wrote. The first error sticks: later reads
// return zero values, and err reports it once at the end.
type rbuf struct {
	b   []byte
	err error
}

func (r *rbuf) fail(err error) {
	if r.err == nil {
		r.err = err
	}
	r.b = nil
}

func (r *rbuf) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(errShort)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *rbuf) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail(errShort)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *rbuf) byte() byte {
	if len(r.b) < 1 {
		r.fail(errShort)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *rbuf) bool() bool { return r.byte() != 0 }

// bytes returns a sub-slice of the message (no copy): the link gives each
// message its own buffer, which mochi may keep.
func (r *rbuf) bytes() []byte {
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		r.fail(errShort)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *rbuf) string() string { return string(r.bytes()) }

// count reads a number of elements that follow, each at least min bytes
// long, so a forged count cannot make the decoder allocate more than the
// message holds.
func (r *rbuf) count(min int) int {
	n := r.uvarint()
	if n > uint64(len(r.b)/min) {
		r.fail(fmt.Errorf("cluster message: count %d exceeds its %d bytes", n, len(r.b)))
		return 0
	}
	return int(n)
}

// done reports the first error. Bytes after the last field are fields of
// a newer version, which this one does not know: ignored.
func (r *rbuf) done() error {
	return r.err
}

// appendPacket encodes a PUBLISH as MQTT 5 does on the wire, so every
// property crosses the link as the publisher sent it. The fields that are
// per-hop or per-receiver are left out: the packet ID (1 stands in for it,
// the receiver assigns its own), topic alias (the topic is resolved),
// subscription identifiers (each receiver adds its subscribers'), and the
// message expiry interval (sent separately, counted down).
func appendPacket(w *wbuf, pk packets.Packet) error {
	out := pk.Copy(false)
	out.ProtocolVersion = 5
	out.FixedHeader.Type = packets.Publish
	out.FixedHeader.Dup = false
	out.Properties.TopicAlias, out.Properties.TopicAliasFlag = 0, false
	out.Properties.SubscriptionIdentifier = nil
	out.Properties.MessageExpiryInterval = 0
	out.Mods = packets.Mods{AllowResponseInfo: true} // response topic and correlation data are encoded only with it
	if out.FixedHeader.Qos > 0 {
		out.PacketID = pk.PacketID
		if out.PacketID == 0 {
			out.PacketID = 1
		}
	}
	var buf bytes.Buffer
	if err := out.PublishEncode(&buf); err != nil {
		return err
	}
	w.bytes(buf.Bytes())
	return nil
}

// readPacket decodes what appendPacket wrote.
func readPacket(r *rbuf) packets.Packet {
	raw := r.bytes()
	if r.err != nil {
		return packets.Packet{}
	}
	var pk packets.Packet
	if len(raw) < 2 {
		r.fail(errors.New("cluster message: packet too short"))
		return pk
	}
	if err := pk.FixedHeader.Decode(raw[0]); err != nil || pk.FixedHeader.Type != packets.Publish {
		r.fail(fmt.Errorf("cluster message: not a PUBLISH packet (header %#x)", raw[0]))
		return pk
	}
	rem, n, err := packets.DecodeLength(bytes.NewReader(raw[1:]))
	if err != nil || 1+n+rem != len(raw) {
		r.fail(errors.New("cluster message: bad packet length"))
		return pk
	}
	pk.FixedHeader.Remaining = rem
	pk.ProtocolVersion = 5
	if err := pk.PublishDecode(raw[1+n:]); err != nil {
		r.fail(fmt.Errorf("cluster message: %w", err))
	}
	return pk
}

// routesMsg is msgRoutes: every route of the sender at version Version.
type routesMsg struct {
	Version uint64
	Filters []string
}

func (m routesMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.Version)
	w.uvarint(uint64(len(m.Filters)))
	for _, f := range m.Filters {
		w.string(f)
	}
	return w.b
}

func decodeRoutes(b []byte) (m routesMsg, err error) {
	r := rbuf{b: b}
	m.Version = r.uvarint()
	n := r.count(1)
	for range n {
		m.Filters = append(m.Filters, r.string())
	}
	return m, r.done()
}

// routeDeltaMsg is msgRouteDelta: one route added or removed, the sender's
// route table then being at Version.
type routeDeltaMsg struct {
	Version uint64
	Added   bool
	Filter  string
}

func (m routeDeltaMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.Version)
	w.bool(m.Added)
	w.string(m.Filter)
	return w.b
}

func decodeRouteDelta(b []byte) (m routeDeltaMsg, err error) {
	r := rbuf{b: b}
	m.Version = r.uvarint()
	m.Added = r.bool()
	m.Filter = r.string()
	return m, r.done()
}

// publishMsg is msgPublish: a message accepted by the sender, for the
// receiver's subscribers, and for its members of the share groups listed
// in Shared (routes "$share/{group}/{filter}") that the sender chose it for.
type publishMsg struct {
	Origin string // publisher's client ID, for No Local
	Expiry uint32 // seconds left of the message expiry interval; 0 = none
	Shared []string
	Packet packets.Packet
	// Held names the failed peers whose held links got the message too
	// (the sessions adopted from them get that copy instead: see
	// cluster_failover.go). HeldOf, on a copy a held link gave up once
	// its peer's sessions were adopted, names that peer: the copy is for
	// the sessions adopted from it alone. Both are optional trailing
	// fields, sent only during a failover; a node of the previous release
	// refuses such a message (it reports the trailing bytes).
	Held   []string
	HeldOf string
	// Via, on a held copy of HeldOf's that the held link of another
	// failed node, its adopter, kept (it died before acknowledging it)
	// and gave up, names that adopter: the copy is for the sessions
	// adopted from HeldOf through Via alone, which skipped the direct
	// copy on Via. Optional, after Held; a receiver that does not know it
	// takes the copy as HeldOf's (a duplicate for sessions adopted from
	// HeldOf elsewhere, which had it).
	Via string

	// src, on a message decoded from a held link's queue to be handed
	// on (linkPublishes), is its mark there: resendHeld records where it
	// sent it (handOvers), for the message as held there, or, with
	// follow, whatever its fate there (handedTo.always). Not sent.
	src linkMark
}

// forProto returns m as a peer speaking version v reads it: without the
// failover marks for a protoV1 peer, whose decoder refuses them. Such a
// peer delivers a held copy to all its subscribers, so resendHeld sends it
// held copies only when it adopted sessions, as the previous release did.
func (m publishMsg) forProto(v int) publishMsg {
	if v < protoV2 {
		m.Held, m.HeldOf, m.Via = nil, "", ""
	}
	return m
}

func (m publishMsg) encode() ([]byte, error) {
	w := wbuf{}
	w.string(m.Origin)
	w.uvarint(uint64(m.Expiry))
	w.uvarint(uint64(len(m.Shared)))
	for _, s := range m.Shared {
		w.string(s)
	}
	if err := appendPacket(&w, m.Packet); err != nil {
		return nil, err
	}
	if len(m.Held) > 0 || m.HeldOf != "" || m.Via != "" {
		w.string(m.HeldOf)
		w.uvarint(uint64(len(m.Held)))
		for _, s := range m.Held {
			w.string(s)
		}
		if m.Via != "" {
			w.string(m.Via)
		}
	}
	return w.b, nil
}

func decodePublish(b []byte) (m publishMsg, err error) {
	r := rbuf{b: b}
	m.Origin = r.string()
	m.Expiry = uint32(min(r.uvarint(), 1<<32-1))
	n := r.count(1)
	for range n {
		m.Shared = append(m.Shared, r.string())
	}
	m.Packet = readPacket(&r)
	if r.err == nil && len(r.b) > 0 {
		m.HeldOf = r.string()
		n := r.count(1)
		for range n {
			m.Held = append(m.Held, r.string())
		}
		if r.err == nil && len(r.b) > 0 {
			m.Via = r.string()
		}
	}
	return m, r.done()
}

// retainedMsg is msgRetained: the retained message of a topic as of Stamp
// (last writer wins, ties broken by node name); an empty payload clears it.
type retainedMsg struct {
	Stamp  int64
	Node   string
	Expiry uint32
	Packet packets.Packet
}

func (m retainedMsg) encode() ([]byte, error) {
	w := wbuf{}
	w.varint(m.Stamp)
	w.string(m.Node)
	w.uvarint(uint64(m.Expiry))
	if err := appendPacket(&w, m.Packet); err != nil {
		return nil, err
	}
	return w.b, nil
}

func decodeRetained(b []byte) (m retainedMsg, err error) {
	r := rbuf{b: b}
	m.Stamp = r.varint()
	m.Node = r.string()
	m.Expiry = uint32(min(r.uvarint(), 1<<32-1))
	m.Packet = readPacket(&r)
	return m, r.done()
}

// claimMsg is msgClaim: client ClientID connected to the sender; the
// receiver ends its connection and session with that ID, and hands the
// session over unless Clean.
type claimMsg struct {
	ID       uint64
	ClientID string
	Clean    bool
	// ConnectAt is a slot that builds between session 8's first CONNECT
	// ordering and Waited read as the CONNECT's start by the sender's
	// wall clock (unix nanoseconds), which a skew between the nodes'
	// clocks made wrong. Sent as 0 (those builds then do not compare),
	// ignored when read.
	ConnectAt int64
	// Waited is how long the CONNECT had waited in the claimant's session
	// hooks when the claim was sent, by its monotonic clock (0: not
	// said). protoV2 and later: encoded only when set, after ConnectAt;
	// read only if present.
	Waited time.Duration

	began time.Time // set on receipt: see answerClaim
}

func (m claimMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.ID)
	w.string(m.ClientID)
	w.bool(m.Clean)
	if m.ConnectAt != 0 || m.Waited > 0 {
		w.varint(m.ConnectAt)
	}
	if m.Waited > 0 {
		w.uvarint(uint64(m.Waited))
	}
	return w.b
}

func decodeClaim(b []byte) (m claimMsg, err error) {
	r := rbuf{b: b}
	m.ID = r.uvarint()
	m.ClientID = r.string()
	m.Clean = r.bool()
	if r.err == nil && len(r.b) > 0 {
		m.ConnectAt = r.varint()
	}
	if r.err == nil && len(r.b) > 0 {
		m.Waited = time.Duration(min(r.uvarint(), 1<<63-1))
	}
	return m, r.done()
}

// claimReplyMsg is msgClaimReply: the answer to claim ID; Found says the
// sender had a session (or connection) for the client, Session is set when
// it moves.
type claimReplyMsg struct {
	ID       uint64
	ClientID string
	Found    bool
	Session  mqtt.Session
	// Busy: the sender is moving the client's session (to another node,
	// or from one): the claim cannot be settled now, the client retries.
	// Encoded after the session, and read only if present, so a node of
	// the previous version still understands the answer.
	Busy bool

	// from and move are set locally, never encoded: the node that
	// answered, and the move when the answer is a session that moves in
	// pieces (msgMoveStart with the claim's ID).
	from string
	move *inMove
}

func (m claimReplyMsg) encode() ([]byte, error) {
	w := wbuf{}
	w.uvarint(m.ID)
	w.string(m.ClientID)
	w.bool(m.Found)
	w.bool(m.Session.ExpirySet)
	w.uvarint(uint64(m.Session.Expiry))
	appendSubscriptions(&w, m.Session.Subscriptions)
	if err := appendQueued(&w, m.Session.Inflight); err != nil {
		return nil, err
	}
	if m.Busy {
		w.bool(true)
	}
	return w.b, nil
}

func appendSubscriptions(w *wbuf, subs []packets.Subscription) {
	w.uvarint(uint64(len(subs)))
	for _, s := range subs {
		w.string(s.Filter)
		w.byte(s.Qos)
		w.bool(s.NoLocal)
		w.bool(s.RetainAsPublished)
		w.byte(s.RetainHandling)
		w.uvarint(uint64(s.Identifier))
	}
}

func readSubscriptions(r *rbuf) []packets.Subscription {
	var subs []packets.Subscription
	n := r.count(6)
	for range n {
		s := packets.Subscription{Filter: r.string(), Qos: r.byte(), NoLocal: r.bool(), RetainAsPublished: r.bool(), RetainHandling: r.byte()}
		s.Identifier = int(min(r.uvarint(), 268_435_455))
		if s.Qos > 2 || s.RetainHandling > 2 {
			r.fail(fmt.Errorf("cluster message: subscription %q: bad QoS or retain handling", s.Filter))
		}
		subs = append(subs, s)
	}
	return subs
}

// appendQueued encodes a session's queued messages with what is theirs in
// the session: packet ID, absolute expiry, origin.
func appendQueued(w *wbuf, pks []packets.Packet) error {
	w.uvarint(uint64(len(pks)))
	for _, pk := range pks {
		w.uvarint(uint64(pk.PacketID))
		w.varint(pk.Expiry)
		w.string(pk.Origin)
		if err := appendPacket(w, pk); err != nil {
			return err
		}
	}
	return nil
}

func readQueued(r *rbuf) []packets.Packet {
	var out []packets.Packet
	n := r.count(4)
	for range n {
		id := uint16(min(r.uvarint(), 65535))
		expiry := r.varint()
		origin := r.string()
		pk := readPacket(r)
		pk.PacketID, pk.Expiry, pk.Origin = id, expiry, origin
		if id == 0 && pk.FixedHeader.Qos > 0 {
			r.fail(errors.New("cluster message: queued message without a packet ID"))
		}
		out = append(out, pk)
	}
	return out
}

func decodeClaimReply(b []byte) (m claimReplyMsg, err error) {
	r := rbuf{b: b}
	m.ID = r.uvarint()
	m.ClientID = r.string()
	m.Found = r.bool()
	m.Session.ExpirySet = r.bool()
	m.Session.Expiry = uint32(min(r.uvarint(), 1<<32-1))
	m.Session.Subscriptions = readSubscriptions(&r)
	m.Session.Inflight = readQueued(&r)
	if r.err == nil && len(r.b) > 0 {
		m.Busy = r.bool()
	}
	return m, r.done()
}

// moveStartMsg is msgMoveStart: the sender moves client ClientID's session
// to the receiver as move Move (numbered by the sender). Claim is the claim
// it answers (0: the sender pushes it, leaving the cluster). The session's
// queued messages follow in msgMoveChunk messages, then msgMoveEnd.
type moveStartMsg struct {
	Move, Claim uint64
	ClientID    string
	Version     byte // the client's MQTT protocol version
	ExpirySet   bool
	Expiry      uint32
	Subs        []packets.Subscription
	// AdoptedFrom is the failed node the session was adopted from, while
	// what that node's held links kept is still on its way to it
	// (cluster_failover.go). Optional trailing field, sent only then.
	AdoptedFrom string
	// AdoptedAt is when the session was adopted from AdoptedFrom (Unix
	// milliseconds; 0: not known), which the destination stores with the
	// mark so that a restart there restores it for as long as the
	// adopter's would (restoreMark). Optional, after AdoptedFrom and sent
	// only with it: a receiver that does not know it ignores it (protoV2
	// decoders ignore trailing fields), and without it the destination
	// counts from its move-in.
	AdoptedAt int64
	// Earlier are the session's older marks, oldest first: failed nodes
	// it was adopted from before AdoptedFrom adopted it (and died while
	// their held copies were still on their way), each with its time.
	// Optional, after AdoptedAt (then sent even if 0): a receiver that
	// does not know it keeps AdoptedFrom's mark alone.
	// Each Earlier mark's Done flag (every broker was done with its held
	// link at the source: the mark stays only for a later one) follows
	// as an optional trailing list, sent only if one is set: a receiver
	// that does not know it takes every mark as active.
	Earlier []earlierMark
}

func (m moveStartMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.Move)
	w.uvarint(m.Claim)
	w.string(m.ClientID)
	w.byte(m.Version)
	w.bool(m.ExpirySet)
	w.uvarint(uint64(m.Expiry))
	appendSubscriptions(&w, m.Subs)
	if m.AdoptedFrom != "" {
		w.string(m.AdoptedFrom)
		if m.AdoptedAt > 0 || len(m.Earlier) > 0 {
			w.varint(m.AdoptedAt)
		}
		if len(m.Earlier) > 0 {
			w.uvarint(uint64(len(m.Earlier)))
			for _, e := range m.Earlier {
				w.string(e.From)
				w.varint(e.At)
			}
			if slices.ContainsFunc(m.Earlier, func(e earlierMark) bool { return e.Done }) {
				w.uvarint(uint64(len(m.Earlier)))
				for _, e := range m.Earlier {
					w.bool(e.Done)
				}
			}
		}
	}
	return w.b
}

func decodeMoveStart(b []byte) (m moveStartMsg, err error) {
	r := rbuf{b: b}
	m.Move = r.uvarint()
	m.Claim = r.uvarint()
	m.ClientID = r.string()
	m.Version = r.byte()
	m.ExpirySet = r.bool()
	m.Expiry = uint32(min(r.uvarint(), 1<<32-1))
	m.Subs = readSubscriptions(&r)
	if r.err == nil && len(r.b) > 0 {
		m.AdoptedFrom = r.string()
		if r.err == nil && len(r.b) > 0 {
			m.AdoptedAt = max(r.varint(), 0)
		}
		if r.err == nil && len(r.b) > 0 {
			n := r.count(2)
			for range n {
				m.Earlier = append(m.Earlier, earlierMark{From: r.string(), At: max(r.varint(), 0)})
			}
		}
		if r.err == nil && len(r.b) > 0 {
			n := r.count(1)
			for i := range n {
				if done := r.bool(); i < len(m.Earlier) {
					m.Earlier[i].Done = done
				}
			}
		}
	}
	return m, r.done()
}

// moveChunkMsg is msgMoveChunk: chunk Seq (from 0) of move Move's queued
// messages, in session order.
type moveChunkMsg struct {
	Move, Seq uint64
	Queued    []packets.Packet
}

func (m moveChunkMsg) encode() ([]byte, error) {
	w := wbuf{}
	w.uvarint(m.Move)
	w.uvarint(m.Seq)
	if err := appendQueued(&w, m.Queued); err != nil {
		return nil, err
	}
	return w.b, nil
}

func decodeMoveChunk(b []byte) (m moveChunkMsg, err error) {
	r := rbuf{b: b}
	m.Move = r.uvarint()
	m.Seq = r.uvarint()
	m.Queued = readQueued(&r)
	return m, r.done()
}

// moveEndMsg is msgMoveEnd: Chunks chunks were sent and the sender detached
// the session, which the receiver now installs and confirms (msgMoveDone);
// or, with Abort, the sender gave the move up and keeps the session.
type moveEndMsg struct {
	Move, Chunks uint64
	Abort        bool
	// PacketID is the last packet ID the source assigned to the session's
	// messages: the destination goes on after it (mochi patch 38), so a
	// delete of a stored message the source still has queued cannot hit
	// the destination's new message under a reused ID. 0: unknown (a
	// sender of the previous release, which did not send it), and not
	// encoded, as a receiver of protoV1 requires (it refuses the field).
	PacketID uint32
}

func (m moveEndMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.Move)
	w.uvarint(m.Chunks)
	w.bool(m.Abort)
	if m.PacketID != 0 {
		w.uvarint(uint64(m.PacketID))
	}
	return w.b
}

func decodeMoveEnd(b []byte) (m moveEndMsg, err error) {
	r := rbuf{b: b}
	m.Move = r.uvarint()
	m.Chunks = r.uvarint()
	m.Abort = r.bool()
	// A node of the previous release sends no packet ID: 0 leaves the
	// destination's own counter (mochi AdoptSession), so its moves still
	// complete during a rolling restart.
	if r.err == nil && len(r.b) > 0 {
		m.PacketID = uint32(r.uvarint())
	}
	return m, r.done()
}

// moveAckMsg is msgMoveAck (chunk Seq of move Move arrived) and msgMoveDone
// (Seq 1: the session is installed; 0: the receiver gave the move up, the
// sender keeps or takes back the session).
type moveAckMsg struct {
	Move, Seq uint64
}

func (m moveAckMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.Move)
	w.uvarint(m.Seq)
	return w.b
}

func decodeMoveAck(b []byte) (m moveAckMsg, err error) {
	r := rbuf{b: b}
	m.Move = r.uvarint()
	m.Seq = r.uvarint()
	return m, r.done()
}

// ownersMsg is msgOwners: client IDs the sender holds a session for, each
// with when it was established there (unix nanoseconds by the sender's
// wall clock; 0 unknown). protoV3: and with how long ago, by the sender's
// monotonic clock when it encoded the message (Ages, nanoseconds; -1
// unknown), sent only to protoV3 peers. msgStaleIDs is the same
// message without Ages: sessions of its receiver, each with the Since
// that receiver sent for it.
type ownersMsg struct {
	IDs   []string
	Since []int64
	Ages  []int64
}

func (m ownersMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(uint64(len(m.IDs)))
	for i, id := range m.IDs {
		w.string(id)
		w.varint(m.Since[i])
	}
	if len(m.Ages) == len(m.IDs) && len(m.Ages) > 0 {
		w.uvarint(uint64(len(m.Ages)))
		for _, a := range m.Ages {
			w.varint(a)
		}
	}
	return w.b
}

func decodeOwners(b []byte) (m ownersMsg, err error) {
	r := rbuf{b: b}
	n := r.count(2)
	for range n {
		m.IDs = append(m.IDs, r.string())
		m.Since = append(m.Since, r.varint())
	}
	if r.err == nil && len(r.b) > 0 && n > 0 {
		// Ages (protoV3), if what follows is that: one per client ID.
		// Anything else is a field of a newer version, ignored (and so
		// are ages that do not decode: the receiver judges by Since).
		t := r
		if k := t.count(1); t.err == nil && k == n {
			ages := make([]int64, 0, k)
			for range k {
				ages = append(ages, t.varint())
			}
			if t.err == nil {
				m.Ages, r = ages, t
			}
		}
	}
	return m, r.done()
}

// moveLateMsg is msgMoveLate: a publish that reached the source of a move
// after it detached the session, for that session alone.
type moveLateMsg struct {
	ClientID string
	Pub      publishMsg // Shared unused
}

func (m moveLateMsg) encode() ([]byte, error) {
	body, err := m.Pub.encode()
	if err != nil {
		return nil, err
	}
	w := wbuf{}
	w.string(m.ClientID)
	w.b = append(w.b, body...)
	return w.b, nil
}

func decodeMoveLate(b []byte) (m moveLateMsg, err error) {
	r := rbuf{b: b}
	m.ClientID = r.string()
	if r.err != nil {
		return m, r.err
	}
	m.Pub, err = decodePublish(r.b)
	return m, err
}

// heldDoneMsg is msgHeldDone: the sender has sent on everything its held
// link kept for the failed node Dead (or held nothing for it). It follows
// those messages on the same link.
type heldDoneMsg struct {
	Dead string
}

func (m heldDoneMsg) encode() []byte {
	w := wbuf{}
	w.string(m.Dead)
	return w.b
}

func decodeHeldDone(b []byte) (m heldDoneMsg, err error) {
	r := rbuf{b: b}
	m.Dead = r.string()
	return m, r.done()
}
