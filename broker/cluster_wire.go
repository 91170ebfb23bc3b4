package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

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

func (r *rbuf) done() error {
	if r.err == nil && len(r.b) != 0 {
		r.err = fmt.Errorf("cluster message: %d bytes after the last field", len(r.b))
	}
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
}

func (m claimMsg) encode() []byte {
	w := wbuf{}
	w.uvarint(m.ID)
	w.string(m.ClientID)
	w.bool(m.Clean)
	return w.b
}

func decodeClaim(b []byte) (m claimMsg, err error) {
	r := rbuf{b: b}
	m.ID = r.uvarint()
	m.ClientID = r.string()
	m.Clean = r.bool()
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
}

func (m claimReplyMsg) encode() ([]byte, error) {
	w := wbuf{}
	w.uvarint(m.ID)
	w.string(m.ClientID)
	w.bool(m.Found)
	w.bool(m.Session.ExpirySet)
	w.uvarint(uint64(m.Session.Expiry))
	w.uvarint(uint64(len(m.Session.Subscriptions)))
	for _, s := range m.Session.Subscriptions {
		w.string(s.Filter)
		w.byte(s.Qos)
		w.bool(s.NoLocal)
		w.bool(s.RetainAsPublished)
		w.byte(s.RetainHandling)
		w.uvarint(uint64(s.Identifier))
	}
	w.uvarint(uint64(len(m.Session.Inflight)))
	for _, pk := range m.Session.Inflight {
		w.uvarint(uint64(pk.PacketID))
		w.varint(pk.Expiry)
		w.string(pk.Origin)
		if err := appendPacket(&w, pk); err != nil {
			return nil, err
		}
	}
	return w.b, nil
}

func decodeClaimReply(b []byte) (m claimReplyMsg, err error) {
	r := rbuf{b: b}
	m.ID = r.uvarint()
	m.ClientID = r.string()
	m.Found = r.bool()
	m.Session.ExpirySet = r.bool()
	m.Session.Expiry = uint32(min(r.uvarint(), 1<<32-1))
	n := r.count(6)
	for range n {
		s := packets.Subscription{Filter: r.string(), Qos: r.byte(), NoLocal: r.bool(), RetainAsPublished: r.bool(), RetainHandling: r.byte()}
		s.Identifier = int(min(r.uvarint(), 268_435_455))
		if s.Qos > 2 || s.RetainHandling > 2 {
			r.fail(fmt.Errorf("cluster message: subscription %q: bad QoS or retain handling", s.Filter))
		}
		m.Session.Subscriptions = append(m.Session.Subscriptions, s)
	}
	n = r.count(4)
	for range n {
		id := uint16(min(r.uvarint(), 65535))
		expiry := r.varint()
		origin := r.string()
		pk := readPacket(&r)
		pk.PacketID, pk.Expiry, pk.Origin = id, expiry, origin
		if id == 0 && pk.FixedHeader.Qos > 0 {
			r.fail(errors.New("cluster message: queued message without a packet ID"))
		}
		m.Session.Inflight = append(m.Session.Inflight, pk)
	}
	return m, r.done()
}
