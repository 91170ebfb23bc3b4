package broker

import (
	"bytes"
	"reflect"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.mongodb.org/mongo-driver/v2/bson"
)

func samplePacket(qos byte) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: true},
		TopicName:   "a/b", Payload: []byte("payload"), PacketID: 9,
		Properties: packets.Properties{ContentType: "text/plain", ResponseTopic: "r", CorrelationData: []byte{1},
			User: []packets.UserProperty{{Key: "k", Val: "v"}}},
	}
}

// clusterSeeds are valid messages of every type, the fuzzer's start.
func clusterSeeds(t testing.TB) map[byte][]byte {
	must := func(b []byte, err error) []byte {
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return map[byte][]byte{
		msgRoutes:     routesMsg{Version: 3, Filters: []string{"a/+", "$share/g/b/#"}}.encode(),
		msgRouteDelta: routeDeltaMsg{Version: 4, Added: true, Filter: "x/#"}.encode(),
		msgPublish:    must(publishMsg{Origin: "c1", Expiry: 30, Shared: []string{"$share/g/a/b"}, Packet: samplePacket(1)}.encode()),
		msgRetained:   must(retainedMsg{Stamp: 77, Node: "n1", Expiry: 5, Packet: samplePacket(0)}.encode()),
		msgClaim:      claimMsg{ID: 5, ClientID: "dev", Clean: true}.encode(),
		msgClaimReply: must(claimReplyMsg{ID: 5, ClientID: "dev", Found: true, Session: mqtt.Session{
			Subscriptions: []packets.Subscription{{Filter: "a/#", Qos: 1, NoLocal: true, Identifier: 4}},
			Inflight:      []packets.Packet{samplePacket(1)}, Expiry: 60, ExpirySet: true}}.encode()),
		msgMoveStart: moveStartMsg{Move: 7, Claim: 5, ClientID: "dev", Version: 4, ExpirySet: true, Expiry: 60,
			Subs: []packets.Subscription{{Filter: "a/#", Qos: 1, RetainHandling: 2, Identifier: 3}}}.encode(),
		msgMoveChunk: must(moveChunkMsg{Move: 7, Seq: 2, Queued: []packets.Packet{samplePacket(1), samplePacket(2)}}.encode()),
		msgMoveEnd:   moveEndMsg{Move: 7, Chunks: 3, Abort: true, PacketID: 65535}.encode(),
		msgMoveAck:   moveAckMsg{Move: 7, Seq: 2}.encode(),
		msgOwners:    ownersMsg{IDs: []string{"dev", "x"}, Since: []int64{1, -2}}.encode(),
	}
}

func decodeAny(typ byte, b []byte) (any, error) {
	switch typ % 12 {
	case 6:
		return decodeMoveStart(b)
	case 7:
		return decodeMoveChunk(b)
	case 8:
		return decodeMoveEnd(b)
	case 9, 10:
		return decodeMoveAck(b)
	case 11:
		return decodeOwners(b)
	case 0:
		return decodeRoutes(b)
	case 1:
		return decodeRouteDelta(b)
	case 2:
		return decodePublish(b)
	case 3:
		return decodeRetained(b)
	case 4:
		return decodeClaim(b)
	default:
		return decodeClaimReply(b)
	}
}

func TestClusterMessagesRoundTrip(t *testing.T) {
	for typ, b := range clusterSeeds(t) {
		m, err := decodeAny(typ-msgRoutes, b)
		if err != nil {
			t.Fatalf("type %d: %v", typ, err)
		}
		switch m := m.(type) {
		case publishMsg:
			p := m.Packet
			if m.Origin != "c1" || m.Expiry != 30 || p.TopicName != "a/b" || string(p.Payload) != "payload" || p.FixedHeader.Qos != 1 ||
				!p.FixedHeader.Retain || p.Properties.ContentType != "text/plain" || len(p.Properties.User) != 1 || m.Shared[0] != "$share/g/a/b" {
				t.Errorf("publish round trip: %+v", m)
			}
		case moveStartMsg:
			if m.Move != 7 || m.Claim != 5 || m.ClientID != "dev" || m.Version != 4 || !m.ExpirySet || m.Expiry != 60 ||
				!reflect.DeepEqual(m.Subs, []packets.Subscription{{Filter: "a/#", Qos: 1, RetainHandling: 2, Identifier: 3}}) {
				t.Errorf("move start round trip: %+v", m)
			}
		case moveChunkMsg:
			if m.Move != 7 || m.Seq != 2 || len(m.Queued) != 2 || m.Queued[1].FixedHeader.Qos != 2 || m.Queued[0].PacketID != 9 {
				t.Errorf("move chunk round trip: %+v", m)
			}
		case moveEndMsg:
			if m != (moveEndMsg{Move: 7, Chunks: 3, Abort: true, PacketID: 65535}) {
				t.Errorf("move end round trip: %+v", m)
			}
		case ownersMsg:
			if !reflect.DeepEqual(m, ownersMsg{IDs: []string{"dev", "x"}, Since: []int64{1, -2}}) {
				t.Errorf("owners round trip: %+v", m)
			}
		case claimReplyMsg:
			s := m.Session
			if !m.Found || m.ClientID != "dev" || !s.ExpirySet || s.Expiry != 60 || len(s.Inflight) != 1 || s.Inflight[0].PacketID != 9 ||
				!reflect.DeepEqual(s.Subscriptions, []packets.Subscription{{Filter: "a/#", Qos: 1, NoLocal: true, Identifier: 4}}) {
				t.Errorf("claim reply round trip: %+v", m)
			}
		}
		// Every truncation is an error, never a panic (but for a move's
		// end without its packet ID, TestMoveEndPreviousRelease).
		for i := range len(b) {
			if typ == msgMoveEnd && i == len(moveEndOld(7, 3, true)) {
				continue
			}
			if _, err := decodeAny(typ-msgRoutes, b[:i]); err == nil {
				t.Errorf("type %d truncated to %d of %d bytes: no error", typ, i, len(b))
			}
		}
	}
}

// TestClaimReplyBusy: Busy travels after the session, and an answer of the
// previous version (without it) still decodes, as not busy.
func TestClaimReplyBusy(t *testing.T) {
	b, err := claimReplyMsg{ID: 1, ClientID: "dev", Found: true, Busy: true}.encode()
	if err != nil {
		t.Fatal(err)
	}
	if m, err := decodeClaimReply(b); err != nil || !m.Busy || !m.Found {
		t.Fatalf("busy answer: %+v, %v", m, err)
	}
	if m, err := decodeClaimReply(b[:len(b)-1]); err != nil || m.Busy || !m.Found {
		t.Fatalf("answer without Busy: %+v, %v", m, err)
	}
}

// moveEndOld is a move's end as the previous release encodes it: without
// the packet ID.
func moveEndOld(move, chunks uint64, abort bool) []byte {
	w := wbuf{}
	w.uvarint(move)
	w.uvarint(chunks)
	w.bool(abort)
	return w.b
}

// TestMoveEndPreviousRelease: a move's end from a node of the previous
// release (no packet ID) still decodes, with packet ID 0 (the destination
// keeps its own counter), so moves from it complete during a rolling
// restart.
func TestMoveEndPreviousRelease(t *testing.T) {
	m, err := decodeMoveEnd(moveEndOld(7, 3, false))
	if err != nil || m != (moveEndMsg{Move: 7, Chunks: 3}) {
		t.Fatalf("move end of the previous release: %+v, %v; want move 7, 3 chunks, packet ID 0", m, err)
	}
	if m, err := decodeMoveEnd(moveEndMsg{Move: 7, Chunks: 3, PacketID: 12}.encode()); err != nil || m.PacketID != 12 {
		t.Fatalf("move end with a packet ID: %+v, %v", m, err)
	}
}

// TestDecodersIgnoreNewerFields: a message of a newer cluster protocol
// version, with a field this version does not know at its end, decodes as
// the message without it (the field ignored), instead of being refused:
// so a rolling restart can add a field. The extra bytes begin with four
// zeros, which is what the optional fields of this version read as when
// absent and a newer field follows them (a claim reply's Busy; a
// publish's HeldOf, Held and Via; a move start's AdoptedFrom, AdoptedAt,
// Earlier and its done flags): a newer encoder writes them, empty, before
// its own (see the note on protoV2).
func TestDecodersIgnoreNewerFields(t *testing.T) {
	for typ, b := range clusterSeeds(t) {
		want, err := decodeAny(typ-msgRoutes, b)
		if err != nil {
			t.Fatalf("type %d: %v", typ, err)
		}
		longer := append(append([]byte(nil), b...), 0, 0, 0, 0, 3, 'n', 'e', 'w')
		got, err := decodeAny(typ-msgRoutes, longer)
		if err != nil {
			t.Errorf("type %d with a newer field: %v", typ, err)
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("type %d with a newer field: %+v, want %+v", typ, got, want)
		}
	}
}

// FuzzClusterMessage feeds arbitrary bytes to the decoders of every message
// a peer can send: none may panic or allocate beyond the input.
func FuzzClusterMessage(f *testing.F) {
	for typ, b := range clusterSeeds(f) {
		f.Add(typ-msgRoutes, b)
	}
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		_, _ = decodeAny(typ, b)
	})
}

// TestFailoverFieldsRoundTrip: the marks of a failover (cluster_failover.go)
// travel as optional trailing fields: set, they round-trip; absent (every
// message but during a failover, and a node of the previous release),
// the message decodes as before.
func TestFailoverFieldsRoundTrip(t *testing.T) {
	plain, err := publishMsg{Origin: "c1", Packet: samplePacket(1)}.encode()
	if err != nil {
		t.Fatal(err)
	}
	marked, err := publishMsg{Origin: "c1", Packet: samplePacket(1), Held: []string{"n2", "n4"}, HeldOf: "n2"}.encode()
	if err != nil {
		t.Fatal(err)
	}
	if m, err := decodePublish(marked); err != nil || m.HeldOf != "n2" || !reflect.DeepEqual(m.Held, []string{"n2", "n4"}) || m.Packet.TopicName != "a/b" {
		t.Fatalf("marked publish: %+v, %v", m, err)
	}
	if m, err := decodePublish(plain); err != nil || m.HeldOf != "" || m.Held != nil {
		t.Fatalf("publish without marks: %+v, %v", m, err)
	}
	if len(marked) <= len(plain) || !reflect.DeepEqual(marked[:len(plain)], plain) {
		t.Fatal("the marks are not a trailing addition to the message")
	}
	for i := len(plain) + 1; i < len(marked); i++ {
		if _, err := decodePublish(marked[:i]); err == nil {
			t.Errorf("marked publish truncated to %d of %d bytes: no error", i, len(marked))
		}
	}
	// Via follows Held; a decoder without it reads the rest as before.
	via, err := publishMsg{Origin: "c1", Packet: samplePacket(1), Held: []string{"n2", "n4"}, HeldOf: "n2", Via: "n4"}.encode()
	if err != nil {
		t.Fatal(err)
	}
	if m, err := decodePublish(via); err != nil || m.HeldOf != "n2" || m.Via != "n4" || !reflect.DeepEqual(m.Held, []string{"n2", "n4"}) {
		t.Fatalf("held copy via an adopter: %+v, %v", m, err)
	}
	if !reflect.DeepEqual(via[:len(marked)], marked) {
		t.Fatal("Via is not a trailing addition to the marked message")
	}

	start := moveStartMsg{Move: 7, ClientID: "dev", Version: 5, Subs: []packets.Subscription{{Filter: "a/#", Qos: 1}}}
	if m, err := decodeMoveStart(start.encode()); err != nil || m.AdoptedFrom != "" {
		t.Fatalf("move start without a mark: %+v, %v", m, err)
	}
	start.AdoptedFrom = "n2"
	if m, err := decodeMoveStart(start.encode()); err != nil || m.AdoptedFrom != "n2" || m.ClientID != "dev" {
		t.Fatalf("move start with a mark: %+v, %v", m, err)
	}
	// A version 2 or 3 decoder without AdoptedAt ignores it (trailing), and
	// one with it reads it.
	start.AdoptedAt = 1_700_000_000_123
	b := start.encode()
	if m, err := decodeMoveStart(b); err != nil || m.AdoptedFrom != "n2" || m.AdoptedAt != start.AdoptedAt {
		t.Fatalf("move start with a mark and its time: %+v, %v", m, err)
	}
	start.AdoptedAt = 0
	if m, err := decodeMoveStart(b[:len(start.encode())]); err != nil || m.AdoptedFrom != "n2" || m.AdoptedAt != 0 {
		t.Fatalf("move start with a mark, its time cut off: %+v, %v", m, err)
	}
	// Earlier marks follow AdoptedAt (then sent even if 0); a decoder
	// without them ignores them.
	start.Earlier = []earlierMark{{From: "n0", At: 1_700_000_000_000}, {From: "n5", At: 7}}
	b = start.encode()
	if m, err := decodeMoveStart(b); err != nil || m.AdoptedFrom != "n2" || m.AdoptedAt != 0 || !reflect.DeepEqual(m.Earlier, start.Earlier) {
		t.Fatalf("move start with earlier marks: %+v, %v", m, err)
	}
	// Their done flags follow, sent only if one is set; a decoder without
	// them takes every mark as active.
	start.Earlier = []earlierMark{{From: "n0", At: 1_700_000_000_000, Done: true}, {From: "n5", At: 7}}
	bd := start.encode()
	if m, err := decodeMoveStart(bd); err != nil || !reflect.DeepEqual(m.Earlier, start.Earlier) {
		t.Fatalf("move start with a done earlier mark: %+v, %v", m, err)
	}
	if m, err := decodeMoveStart(bd[:len(b)]); err != nil || m.Earlier[0].Done || len(m.Earlier) != 2 {
		t.Fatalf("move start, its done flags cut off: %+v, %v", m, err)
	}
	start.Earlier = nil
	if m, err := decodeMoveStart(b[:len(start.encode())+1]); err != nil || m.AdoptedFrom != "n2" || m.AdoptedAt != 0 || m.Earlier != nil {
		t.Fatalf("move start, its earlier marks cut off: %+v, %v", m, err)
	}
	if m, err := decodeHeldDone(heldDoneMsg{Dead: "n2"}.encode()); err != nil || m.Dead != "n2" {
		t.Fatalf("held done: %+v, %v", m, err)
	}
}

// TestHeldSkip: the delivery rule of a failover's copies.
func TestHeldSkip(t *testing.T) {
	for _, c := range []struct {
		adopted []string
		heldOf  string
		held    []string
		skip    bool
	}{
		{nil, "", nil, false},                         // an ordinary message
		{[]string{"n2"}, "", nil, false},              // published for no held link: the adopted session gets it
		{[]string{"n2"}, "", []string{"n2"}, true},    // the direct copy of a held one: the held copy is the session's
		{[]string{"n4"}, "", []string{"n2"}, false},   //
		{nil, "", []string{"n2"}, false},              // other sessions get the direct copy
		{[]string{"n2"}, "n2", []string{"n2"}, false}, // the held copy: the adopted session's
		{nil, "n2", nil, true},                        // and nobody else's
		{[]string{"n4"}, "n2", nil, true},
		{[]string{"n2"}, "n4", []string{"n2"}, true}, // n4's copy of what n2's held link took: n2's copy is the session's
		// Adopted from n2, then again from its adopter n4, which died
		// while n2's held copies were on their way: one copy of each
		// message, through the oldest mark's held link when it took it.
		{[]string{"n2", "n4"}, "", []string{"n2"}, true},
		{[]string{"n2", "n4"}, "", []string{"n4"}, true},
		{[]string{"n2", "n4"}, "", nil, false},
		{[]string{"n2", "n4"}, "n2", []string{"n2"}, false},
		{[]string{"n2", "n4"}, "n4", []string{"n2"}, true}, // a direct copy to n4 it never acknowledged: n2's is the session's
		{[]string{"n2", "n4"}, "n4", nil, false},           // the same, published for no held link
		{[]string{"n2", "n4"}, "n4", []string{"n4"}, false},
		{[]string{"n2", "n4"}, "n2", []string{"n2", "n4"}, false}, // both held links took it: n2's copy
		{[]string{"n2", "n4"}, "n4", []string{"n2", "n4"}, true},
		{[]string{"n4"}, "n4", []string{"n2", "n4"}, false}, // adopted from n4 alone: n4's copy
	} {
		if got := heldSkip(c.adopted, c.held, c.heldOf, ""); got != c.skip {
			t.Errorf("heldSkip(%q, %v, %q) = %v, want %v", c.adopted, c.held, c.heldOf, got, c.skip)
		}
		var m adoptedMarks
		for _, n := range c.adopted {
			m.set("s", n)
		}
		if got := m.skip("s", c.held, c.heldOf, ""); got != c.skip {
			t.Errorf("adoptedMarks.skip(%q, %v, %q) = %v, want %v", c.adopted, c.held, c.heldOf, got, c.skip)
		}
	}
	// n2's held copy that n4's held link kept (n4 died before taking it):
	// for the sessions adopted from n2 through n4 alone.
	for _, c := range []struct {
		adopted []string
		held    []string
		skip    bool
	}{
		{[]string{"n2", "n4"}, []string{"n2"}, false},
		{[]string{"n2", "n4"}, nil, false},
		{[]string{"n2"}, []string{"n2"}, true}, // adopted from n2 elsewhere: it had its copy
		{[]string{"n4"}, []string{"n2"}, true}, // on n4 without n2's mark: it had the direct copy
		{nil, nil, true},
	} {
		if got := heldSkip(c.adopted, c.held, "n2", "n4"); got != c.skip {
			t.Errorf("heldSkip(%q, %v, n2, via n4) = %v, want %v", c.adopted, c.held, got, c.skip)
		}
		var m adoptedMarks
		for _, n := range c.adopted {
			m.set("s", n)
		}
		if got := m.skip("s", c.held, "n2", "n4"); got != c.skip {
			t.Errorf("adoptedMarks.skip(%q, %v, n2, via n4) = %v, want %v", c.adopted, c.held, got, c.skip)
		}
	}
}

// TestAdoptedMarksPerNode: a session's marks are kept oldest first and
// cleared one by one.
func TestAdoptedMarksPerNode(t *testing.T) {
	var m adoptedMarks
	tok := m.set("s", "n0")
	m.set("s", "n1")
	m.set("o", "n1")
	if got := markedFrom(m.list("s"), false); !reflect.DeepEqual(got, []string{"n0", "n1"}) {
		t.Fatalf("marks of s = %v, want [n0 n1]", got)
	}
	m.set("s", "n0") // renewed in place: the old token no longer clears it
	m.clearToken("s", tok)
	if !m.has("s", "n0") {
		t.Fatal("a stale token cleared a renewed mark")
	}
	// n0's held copies are all sent: its mark stays for n1's (a message
	// both held links took is n0's copy's), and goes with n1's.
	m.forget("n0")
	if got := markedFrom(m.list("s"), false); !reflect.DeepEqual(got, []string{"n0", "n1"}) {
		t.Fatalf("after forget(n0): %v, want [n0 n1]", got)
	}
	m.forget("n1")
	if (len(m.list("s")) > 0) || (len(m.list("o")) > 0) || m.n.Load() != 0 {
		t.Fatalf("after forget(n1): s %v, o %v, %d marked; want none", markedFrom(m.list("s"), false), markedFrom(m.list("o"), false), m.n.Load())
	}
	// A later mark goes on its own.
	m.set("s", "n0")
	m.set("s", "n1")
	m.forget("n1")
	if got := markedFrom(m.list("s"), false); !reflect.DeepEqual(got, []string{"n0"}) || m.n.Load() != 1 {
		t.Fatalf("after forget(n1): %v, want [n0]", got)
	}
	m.reset("s", []earlierMark{{From: "n2"}, {From: "n3"}})
	if got := markedFrom(m.list("s"), false); !reflect.DeepEqual(got, []string{"n2", "n3"}) {
		t.Fatalf("after reset: %v", got)
	}
	// A moved-in mark flagged done stays done, for the later one alone.
	m.reset("s", []earlierMark{{From: "n2", Done: true}, {From: "n3"}})
	if got, act := markedFrom(m.list("s"), false), markedFrom(m.list("s"), true); !reflect.DeepEqual(got, []string{"n2", "n3"}) || !reflect.DeepEqual(act, []string{"n3"}) {
		t.Fatalf("after reset with n2 done: %v, active %v; want [n2 n3], active [n3]", got, act)
	}
	m.clear("s", []string{"n2", "n3"})
	if m.n.Load() != 0 || (len(m.list("s")) > 0) {
		t.Fatal("marks left after clear")
	}
}

// TestFailoverMarksOnlyToV2: a peer of the previous release (protoV1)
// refuses a publish with trailing bytes, so the failover marks are left off
// what it is sent: its body is byte for byte the unmarked message. A
// protoV2 peer gets them.
func TestFailoverMarksOnlyToV2(t *testing.T) {
	m := publishMsg{Origin: "c1", Packet: samplePacket(1), Held: []string{"n2"}, HeldOf: "n2"}
	plain, err := publishMsg{Origin: "c1", Packet: samplePacket(1)}.encode()
	if err != nil {
		t.Fatal(err)
	}
	v1, err := m.forProto(protoV1).encode()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(v1, plain) {
		t.Fatal("a protoV1 peer is sent the failover marks")
	}
	if got := m.forProto(protoV2); got.HeldOf != "n2" || !reflect.DeepEqual(got.Held, []string{"n2"}) {
		t.Fatalf("a protoV2 peer loses the marks: %+v", got)
	}
}

// TestClaimWaited: a claim's Waited (how long its CONNECT waited, by the
// claimant's monotonic clock) round-trips after a ConnectAt slot sent as
// 0, which the builds that read a wall-clock time there take as "not
// said"; a claim without it (protoV1, or such a build) decodes with
// Waited 0, and its ConnectAt is read and not used.
func TestClaimWaited(t *testing.T) {
	plain := claimMsg{ID: 5, ClientID: "dev"}.encode()
	b := claimMsg{ID: 5, ClientID: "dev", Waited: 1500 * time.Millisecond}.encode()
	if m, err := decodeClaim(b); err != nil || m.Waited != 1500*time.Millisecond || m.ConnectAt != 0 {
		t.Fatalf("claim with Waited: %+v, %v", m, err)
	}
	if len(b) <= len(plain)+1 || !reflect.DeepEqual(b[:len(plain)+1], append(plain, 0)) {
		t.Fatalf("Waited does not follow a ConnectAt slot of 0: % x, plain % x", b, plain)
	}
	if m, err := decodeClaim(plain); err != nil || m.Waited != 0 || m.ConnectAt != 0 {
		t.Fatalf("claim without Waited: %+v, %v", m, err)
	}
	old := append(append([]byte(nil), plain...), 0x80, 0x80, 0x01) // a ConnectAt, no Waited
	if m, err := decodeClaim(old); err != nil || m.Waited != 0 || m.ConnectAt == 0 {
		t.Fatalf("claim with a ConnectAt only: %+v, %v", m, err)
	}
}

// TestOwnersAges: an owners list carries each session's age to a protoV3
// peer as a trailing field; a list without it decodes as before, and one
// with it decodes, ages ignored, by a decoder that knows only the pairs
// (protoV2 ignores trailing fields).
func TestOwnersAges(t *testing.T) {
	m := ownersMsg{IDs: []string{"dev", "x"}, Since: []int64{1, -2}, Ages: []int64{5e9, -1}}
	got, err := decodeOwners(m.encode())
	if err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("owners with ages: %+v, %v; want %+v", got, err, m)
	}
	plain := ownersMsg{IDs: m.IDs, Since: m.Since}
	if got, err := decodeOwners(plain.encode()); err != nil || got.Ages != nil {
		t.Fatalf("owners without ages: %+v, %v", got, err)
	}
	// A protoV2 decoder reads the pairs and stops: the ages are after them.
	if !bytes.HasPrefix(m.encode(), plain.encode()) {
		t.Fatal("ages are not a trailing field")
	}
}

// TestStoredEarlierMarksOptional: a stored session with earlier marks is
// read by a release that does not know them (its adopted_from and
// adopted_at as before), and one without them by this release.
func TestStoredEarlierMarksOptional(t *testing.T) {
	b, err := bson.Marshal(sessionDoc{ID: "s", Owner: "n3", AdoptedFrom: "n1", AdoptedAt: 5, AdoptedEarlier: []earlierMark{{From: "n0", At: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	var prev struct {
		ID          string `bson:"_id"`
		Owner       string `bson:"owner"`
		AdoptedFrom string `bson:"adopted_from,omitempty"`
		AdoptedAt   int64  `bson:"adopted_at,omitempty"`
	}
	if err := bson.Unmarshal(b, &prev); err != nil || prev.AdoptedFrom != "n1" || prev.AdoptedAt != 5 {
		t.Fatalf("previous release reads %+v, %v", prev, err)
	}
	if b, err = bson.Marshal(prev); err != nil {
		t.Fatal(err)
	}
	var s sessionDoc
	if err := bson.Unmarshal(b, &s); err != nil || s.AdoptedFrom != "n1" || s.AdoptedEarlier != nil {
		t.Fatalf("this release reads the previous one's %+v, %v", s, err)
	}
}

// A session adopted from n1 earlier (that failover over: its mark done),
// then from n2, takes n2's held copies when n1 fails again (a new
// generation): n1's new held link holds nothing for it. bench/chaos
// stopkill lost these (h13b11). Of the same failure, n1's done mark
// still picks n1's link (a message both took comes once).
func TestHeldSkipDoneMarkOfRefailedNode(t *testing.T) {
	ms := []adoptedMark{{from: "n1", done: true, gen: 1}, {from: "n2", gen: 1}}
	again := func(string) uint64 { return 2 }
	same := func(string) uint64 { return 1 }
	for _, held := range [][]string{{"n1", "n2"}, {"n2", "n1"}} {
		if heldSkipMarks(ms, held, "n2", again) {
			t.Errorf("held %v: n2's held copy skipped by a session adopted from n2 (n1 failed again)", held)
		}
		if !heldSkipMarks(ms, held, "n1", again) {
			t.Errorf("held %v: n1's new held copy taken by a session adopted from n2", held)
		}
		if !heldSkipMarks(ms, held, "", again) {
			t.Errorf("held %v: direct copy taken by a session adopted from n2", held)
		}
		if !heldSkipMarks(ms, held, "n2", same) {
			t.Errorf("held %v: n2's copy of a message n1's link (same failure) took too, taken twice", held)
		}
	}
}
