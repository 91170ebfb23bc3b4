package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

// durableHook keeps persistent sessions (subscriptions, will, and the QoS
// 1/2 messages held for them) and retained messages in the store, so a
// restarted node restores them and a survivor can adopt the sessions of a
// node that died (docs/broker.md "Persistence", docs/clustering.md
// "Durability").
//
// Every change is one op handed to a writebehind.Writer, which writes them
// in batches (group commit) from its own goroutine, in order. A QoS 1/2
// PUBLISH that went to at least one persistent session is acknowledged
// only once the batch holding its writes is committed, or once every
// persistent session it was written for has acknowledged it, whichever
// comes first (mochi patch 54, OnPublishHold): either way the promise of a
// PUBACK is kept, and a message acknowledged before its batch is taken is
// never written at all. The acknowledgements wait in order on another
// goroutine, without blocking the publisher's connection. A publish to
// non-persistent subscribers only sets and clears a flag of its connection.
//
// Session documents carry their owner (a node name) and an epoch: a node
// writes a session only while it owns it (a conditional update), and a node
// that adopts a dead node's session takes it with a conditional update on
// the old owner and epoch, so two nodes never both own a session.
type durableHook struct {
	mqtt.HookBase
	b    *Broker
	st   *store.Store
	node string
	w    *writebehind.Writer[durOp]
	log  *slog.Logger

	ctx    context.Context // ends when the hook closes: held acknowledgements fail
	cancel context.CancelFunc

	mu sync.Mutex
	// pubs: client ID → *pubSlot, the PUBLISH in progress of the client's
	// latest connection that published. A sync.Map read, not d.mu and a
	// map write, so the common QoS 1/2 PUBLISH (it writes nothing
	// durable) takes no lock and allocates nothing.
	pubs sync.Map
	// waiting maps a message queued for writing for a persistent session
	// (msgKey) to its state, until the session acknowledges it or its
	// write is committed.
	waiting map[string]*heldMsg
	known   map[string]bool // client IDs this node wrote (or loaded) a session document for
	// pids: the packet ID last recorded in the stored session of a client
	// here (see recordPIDLocked).
	pids map[string]uint16
	// establishing: the connection of each client ID between its
	// OnSessionEstablish and OnSessionEstablished (see OnWillSent).
	establishing map[string]*mqtt.Client
	// skipped: per client ID, the store writes of an older connection's
	// end (disconnect, will published) that OnDisconnect and OnWillSent
	// left to a newer connection establishing here, until that one is
	// established (its writes supersede them) or not (refused, or its
	// CONNACK failed): then they are made after all (skippedLocked).
	skipped map[string]*skippedEnd
	// establishSwept: when establishing, preWritten and skipped were last
	// swept of connections whose CONNECT failed after the hooks ran
	// (sweepEstablishingLocked); establishSweepEvery: how often (tests: 0).
	establishSwept      time.Time
	establishSweepEvery time.Duration
	// preWritten: the subscriptions of the session document storeWill
	// wrote for a persistent connection before its CONNACK, until its
	// OnSessionEstablished (which writes it again only if they changed).
	preWritten map[*mqtt.Client]map[string]packets.Subscription
	// prior: the subscriptions a persistent client's SUBSCRIBE in progress
	// replaces (OnSubscribe to OnSubscribed, on its read loop), to put
	// back if the SUBSCRIBE is refused.
	prior map[*mqtt.Client]map[string]packets.Subscription
	// unstored: the last session document of a client here that write
	// refused because another node owned the stored session (a move's
	// source, whose late write landed first), until movedIn, having taken
	// the stored session over, queues it again. A newer document of the
	// client, queued or written, removes the entry.
	unstored map[string]*sessionDoc
	// gone: client IDs whose session this node handed to another node
	// (moved, or ended by a claim): session writes still queued for them
	// are skipped, so a late one cannot bring back a stale document after
	// the new node took it over. Cleared when the client is back here.
	gone map[string]time.Time
	// goneSwept: when gone was last swept of entries older than goneKeep.
	goneSwept time.Time
	epoch     map[string]ownInfo // the epoch (others: 1) and mark "adopted from" of sessions restored or adopted here, or moved here marked (movedMark)

	seq atomic.Int64 // orders a session's message documents

	coalesced atomic.Int64 // messages acknowledged before their batch was written: never written
	lost      atomic.Int64 // session writes refused because another node owns the session

	barrierTimeouts atomic.Int64 // link acknowledgements sent before the store confirmed
	barrierDropped  atomic.Int64 // link acknowledgements refused: a write they covered was dropped
	movedInFailed   atomic.Int64 // moved-in sessions whose stored document could not be taken over
	movedInNoDoc    atomic.Int64 // moved-in sessions whose stored document movedIn did not find
	movedInStale    atomic.Int64 // stale stored documents of moved-in clients that keep none, deleted
	// refusedOwnerUnreachable counts CONNECTs refused (to be retried)
	// because the node owning the client's stored session was unreachable
	// but not yet declared failed.
	refusedOwnerUnreachable atomic.Int64
	subscribeRefused        atomic.Int64 // subscriptions refused (0x80): the session was not stored (in time)
	subscribeWait           atomic.Int64 // tests: durableSubscribeMax instead, in nanoseconds
	willUnstored            atomic.Int64 // CONNACKs sent before the client's will was stored
	adopted                 atomic.Int64 // sessions taken from nodes that died (or left)
	reforwarded             atomic.Int64 // publishes a dead node's link held, sent on to adopters
	// supersededSkipped counts stored sessions of a dead node not adopted
	// because their client was connected to a live node already.
	supersededSkipped atomic.Int64
	reforwardTo       map[string][]string             // released failed peer → adopters, until its link's queue is handed over
	heldDoneSent      map[string]bool                 // failed peers this node told the cluster it sent on what it held for (cluster_failover.go)
	adoptions         adoptions                       // durable_cluster.go: sessions being adopted here
	fail              failover                        // durable_cluster.go: adoptions of failed brokers' sessions
	testAfterClaim    atomic.Pointer[func(id string)] // tests: called once a session is claimed, before it is installed
	// testOnDisconnect (tests) is called first in OnDisconnect.
	testOnDisconnect atomic.Pointer[func(cl *mqtt.Client)]
	// testSessionRewrite (tests) is called by the writer once the first
	// command rewriting stored session documents (ids) is done, before the
	// batch's next command: where a kill -9 stops the writer.
	testSessionRewrite atomic.Pointer[func(ids []string)]
}

// ackHold is what one PUBLISH's acknowledgement waits for: the commit of
// its writes (t), or, when all it wrote were messages for persistent
// sessions, those sessions' acknowledgements, whichever comes first. Its
// fields are guarded by durableHook.mu.
type ackHold struct {
	t   writebehind.Ticket
	set bool
	err error
	// commit: something other than a session's message was written (a
	// retained message): only the commit releases the acknowledgement.
	commit bool
	// pending counts the sessions that have not acknowledged the message,
	// plus one until OnPublishHold (none can release it before).
	pending int
	acked   chan struct{} // closed when pending reaches 0 (made by OnPublishHold)
}

// heldMsg is a message queued for a persistent session's writes, until
// the session acknowledges it or its batch is committed.
type heldMsg struct {
	hold  *ackHold // the publisher's hold, if its acknowledgement waits
	state atomic.Int32
}

// heldMsg states: an acknowledgement that finds the message still queued
// marks it so its write is skipped (and needs no delete); once its batch is
// taken, the acknowledgement queues a delete after it.
const (
	msgQueued int32 = iota
	msgTaken
	msgAcked
)

type opKind uint8

const (
	opSession     opKind = iota // upsert the session document
	opSessionDel                // delete the session and its messages
	opMsg                       // insert a held message
	opMsgDel                    // delete a held message (acknowledged, expired)
	opRetain                    // set or clear a retained message
	opWillCleared               // the session's will was published
	opMsgRel                    // a held QoS 2 message reached its PUBREL step
	opSessionTake               // take the stored session over from the node it moved from (durOp.from)
	opSkip                      // a write found obsolete when its batch was taken
	opPID                       // record the session's packet ID counter (see recordPIDLocked)
)

type durOp struct {
	kind   opKind
	client string
	from   string // opSessionTake
	pid    uint16
	sess   *sessionDoc
	msg    *msgDoc
	ret    *retainedDoc
	held   *heldMsg // opMsg: its entry in durableHook.waiting
	// refused (opSession, if set) is set once the batch is committed if
	// the document was not written: another node owns the stored session.
	// The ticket alone reports success then.
	refused *atomic.Bool
	// redo: opSession of a document refused before, queued again by
	// movedIn once this node owns the stored session (see unstored).
	redo bool
}

// sessionDoc is a persistent session in store.CollSessions.
type sessionDoc struct {
	ID        string   `bson:"_id"`
	Owner     string   `bson:"owner"`
	Proto     byte     `bson:"proto"`
	Expiry    uint32   `bson:"expiry"`
	ExpirySet bool     `bson:"expiry_set"`
	Subs      []subDoc `bson:"subs"`
	Will      *willDoc `bson:"will,omitempty"`
	Connected bool     `bson:"connected"`
	// DisconnectedAt is when the client went offline (Unix seconds), 0
	// while connected: the session's expiry counts from it.
	DisconnectedAt int64     `bson:"disconnected_at"`
	Updated        time.Time `bson:"updated"`
	Epoch          int64     `bson:"epoch"` // set on insert, raised by every adoption and take-over, kept by a rewrite
	// WillOnly marks a client without a persistent session, recorded for
	// its will while it is connected.
	WillOnly bool `bson:"will_only,omitempty"`
	// AdoptedFrom is the node a survivor took the session from, AdoptedAt
	// when (Unix milliseconds): a restart of the adopter soon after marks
	// the session again (cluster_failover.go, restoreMark).
	AdoptedFrom string `bson:"adopted_from,omitempty"`
	AdoptedAt   int64  `bson:"adopted_at,omitempty"`
	// AdoptedEarlier are the session's older marks, oldest first: the
	// failed nodes it was adopted from before AdoptedFrom adopted it, if
	// AdoptedFrom died while their held copies were still on their way
	// (cluster_failover.go). A field of its own, so that the previous
	// release, which does not know it, reads AdoptedFrom as before (and
	// drops this one when it writes the document).
	AdoptedEarlier []earlierMark `bson:"adopted_earlier,omitempty"`
	// PID is a packet ID the session's node assigned lately (recordPIDLocked):
	// a node that restores the session goes on from pidResume(PID).
	PID uint16 `bson:"pid,omitempty"`

	// fresh: this node knew of no stored document of the client when it
	// queued this one (see write).
	fresh bool
}

type ownInfo struct {
	epoch   int64
	from    string
	at      int64         // sessionDoc.AdoptedAt
	earlier []earlierMark // sessionDoc.AdoptedEarlier
}

// earlierMark is a mark "adopted from From at At" (Unix milliseconds) of a
// session adopted again since (sessionDoc.AdoptedEarlier).
type earlierMark struct {
	From string `bson:"from"`
	At   int64  `bson:"at"`
	// Done: every broker was done with From's held link where the mark
	// was (adoptedMark.done); on the wire only (moveStartMsg.Earlier).
	Done bool `bson:"-"`
}

type subDoc struct {
	Filter            string `bson:"f"`
	Qos               byte   `bson:"q"`
	NoLocal           bool   `bson:"nl,omitempty"`
	RetainAsPublished bool   `bson:"rap,omitempty"`
	RetainHandling    byte   `bson:"rh,omitempty"`
	Identifier        int    `bson:"id,omitempty"`
}

type willDoc struct {
	Topic   string      `bson:"topic"`
	Payload []byte      `bson:"payload"`
	Qos     byte        `bson:"qos"`
	Retain  bool        `bson:"retain"`
	Delay   uint32      `bson:"delay"`
	User    [][2]string `bson:"user,omitempty"`
}

func (w *willDoc) will() mqtt.Will {
	m := mqtt.Will{Flag: 1, TopicName: w.Topic, Payload: w.Payload, Qos: w.Qos, Retain: w.Retain, WillDelayInterval: w.Delay}
	for _, u := range w.User {
		m.User = append(m.User, packets.UserProperty{Key: u[0], Val: u[1]})
	}
	return m
}

// msgDoc is a QoS 1/2 message held for a session, in
// store.CollSessionMessages, keyed by client ID and packet ID (a session
// has one message per packet ID at a time).
type msgDoc struct {
	ID      string `bson:"_id"`
	Client  string `bson:"c"`
	Seq     int64  `bson:"seq"` // arrival order in the session
	PID     uint16 `bson:"pid"`
	Packet  []byte `bson:"pk"` // MQTT 5 PUBLISH as appendPacket encodes it
	Origin  string `bson:"origin,omitempty"`
	Created int64  `bson:"created"`
	Expiry  int64  `bson:"expiry,omitempty"` // Unix seconds, 0: none
	SubIDs  []int  `bson:"subids,omitempty"`
	// Rel: the session received the message (PUBREC) and was sent its
	// PUBREL; what is restored is the PUBREL, awaiting PUBCOMP.
	Rel bool `bson:"rel,omitempty"`

	// pk is the message, encoded into Packet only when the document is
	// written: most are acknowledged before their batch and never are.
	pk packets.Packet
}

// retainedDoc is a topic's retained message in store.CollRetained; a clear
// is kept (Cleared) so an older write cannot bring the message back.
type retainedDoc struct {
	Topic   string `bson:"_id"`
	Stamp   int64  `bson:"stamp"` // Unix nanoseconds at Node; last writer wins
	Node    string `bson:"node"`
	Cleared bool   `bson:"cleared"`
	Packet  []byte `bson:"pk,omitempty"`
	Expiry  int64  `bson:"expiry,omitempty"`
}

// durableMinAge is how long a write waits in memory before the store
// writer takes it: a subscriber that keeps up acknowledges its message
// within it, and the message is then never written (nor deleted), so the
// store sees only the messages of offline and slow sessions. The
// publisher's acknowledgement waits for the subscribers' instead
// (OnPublishHold), or for this plus the commit.
const durableMinAge = 50 * time.Millisecond

func msgKey(client string, pid uint16) string { return client + "\x00" + strconv.Itoa(int(pid)) }

func newDurableHook(b *Broker, st *store.Store) (*durableHook, error) {
	d := &durableHook{b: b, st: st, node: b.cfg.NodeName, log: b.log.With("component", "durable"),
		waiting: map[string]*heldMsg{}, known: map[string]bool{}, prior: map[*mqtt.Client]map[string]packets.Subscription{}, unstored: map[string]*sessionDoc{}, gone: map[string]time.Time{}, epoch: map[string]ownInfo{}, pids: map[string]uint16{}, establishing: map[string]*mqtt.Client{}, skipped: map[string]*skippedEnd{}, establishSweepEvery: time.Second, preWritten: map[*mqtt.Client]map[string]packets.Subscription{}, reforwardTo: map[string][]string{},
		fail: failover{kick: make(chan struct{}, 1)}}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.seq.Store(time.Now().UnixNano())
	w, err := writebehind.New(writebehind.Options[durOp]{
		Name:     "sessions",
		Write:    d.write,
		MaxBatch: 4096,
		MinAge:   durableMinAge,
		// The writes of one session are bounded by broker.max_queued (its
		// messages), so memory by the node's sessions; Put waits past it.
		QueueLen: 16384,
		Logger:   d.log,
	})
	if err != nil {
		return nil, err
	}
	d.w = w
	go d.sweepEstablishingLoop()
	return d, nil
}

func (d *durableHook) ID() string { return "rtm-durable" }

func (d *durableHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnSubscribe, mqtt.OnSubscribed, mqtt.OnUnsubscribed,
		mqtt.OnRetainMessage, mqtt.OnQosPublish, mqtt.OnQosComplete, mqtt.OnQosDropped, mqtt.OnClientExpired,
		mqtt.OnPublish, mqtt.OnPublishHold, mqtt.OnWillSent:
		return true
	}
	return false
}

// persistent reports whether cl's session outlives its connection: MQTT
// 3.1.1 clean session false, MQTT 5 session expiry above 0.
func persistent(cl *mqtt.Client) bool {
	if cl.Net.Inline {
		return false
	}
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryIntervalFlag && cl.Properties.Props.SessionExpiryInterval > 0
	}
	return !cl.Properties.Clean
}

// put queues op, waiting for room, and returns its ticket.
func (d *durableHook) put(op durOp) (writebehind.Ticket, error) {
	return d.w.Put(d.ctx, op)
}

// OnPublish marks the start of a QoS 1/2 PUBLISH of cl: the writes made for
// it until OnPublishHold are collected under cl's ID (a client's PUBLISHes
// are handled one after another).
func (d *durableHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Qos > 0 && !cl.Net.Inline {
		s := d.slot(cl)
		if s.h.Load() != nil {
			// A hold left by a PUBLISH that ended before OnPublishHold
			// (refused after this hook): not this one's.
			d.mu.Lock()
			s.h.Store(nil)
			d.mu.Unlock()
		}
		s.collecting.Store(true)
	}
	return pk, nil
}

// pubSlot is a connection's PUBLISH in progress: the connection (a
// take-over makes another under the same ID), whether a PUBLISH of it is
// collecting writes, and its hold, made at its first write. Made once per
// connection that publishes at QoS 1/2.
type pubSlot struct {
	cl         *mqtt.Client
	collecting atomic.Bool
	// h is stored under d.mu (hold); OnPublishHold loads it without the
	// lock to see whether the PUBLISH wrote anything.
	h atomic.Pointer[ackHold]
}

// slot returns cl's pubSlot, making it at cl's first QoS 1/2 PUBLISH (or
// the first since another connection under its ID published).
func (d *durableHook) slot(cl *mqtt.Client) *pubSlot {
	s := (*pubSlot)(nil)
	for {
		v, ok := d.pubs.Load(cl.ID)
		if ok && v.(*pubSlot).cl == cl {
			return v.(*pubSlot)
		}
		if cl.IsTakenOver() {
			// A late PUBLISH of a connection taken over: it must not
			// replace the slot of the connection that took it over.
			return &pubSlot{cl: cl}
		}
		if s == nil {
			s = &pubSlot{cl: cl}
		}
		if !ok {
			if _, loaded := d.pubs.LoadOrStore(cl.ID, s); !loaded {
				return s
			}
		} else if d.pubs.CompareAndSwap(cl.ID, v, s) {
			return s
		}
	}
}

// dropSlot forgets cl's pubSlot (its connection ended), unless the slot is
// a newer connection's under the same ID.
func (d *durableHook) dropSlot(cl *mqtt.Client) {
	if v, ok := d.pubs.Load(cl.ID); ok && v.(*pubSlot).cl == cl {
		d.pubs.CompareAndDelete(cl.ID, v)
	}
}

// hold returns origin's hold, making it at the first write of its PUBLISH;
// nil when no PUBLISH of origin is collecting. d.mu is held.
func (d *durableHook) hold(origin string) *ackHold {
	v, ok := d.pubs.Load(origin)
	if !ok {
		return nil
	}
	s := v.(*pubSlot)
	if !s.collecting.Load() {
		return nil
	}
	h := s.h.Load()
	if h == nil {
		h = &ackHold{pending: 1}
		s.h.Store(h)
	}
	return h
}

// record makes the acknowledgement of origin's current PUBLISH, if one is
// collecting, wait for t (tickets settle in order: the latest covers the
// earlier ones). commit: the write is not a session's message, so no
// acknowledgement by a session can stand in for its commit.
func (d *durableHook) record(origin string, t writebehind.Ticket, err error, commit bool) {
	d.mu.Lock()
	if h := d.hold(origin); h != nil {
		if err != nil {
			h.err = err
		} else if !h.set || !h.t.Covers(t) {
			// The latest ticket, not the last recorded: a message relayed
			// or forwarded under the same origin can record an older one.
			h.t, h.set = t, true
		}
		h.commit = h.commit || commit
	}
	d.mu.Unlock()
}

// expect registers the message key as about to be queued for writing, for
// origin's current PUBLISH if one is collecting, before its write is
// queued (so the write's commit can unregister it). It reports whether
// the message's packet ID pid is to be recorded for the session of client
// (recordPIDLocked), under the same lock.
func (d *durableHook) expect(origin, key, client string, pid uint16) (*heldMsg, bool) {
	m := &heldMsg{}
	d.mu.Lock()
	rec := d.recordPIDLocked(client, pid)
	if h := d.hold(origin); h != nil {
		h.pending++
		m.hold = h
	}
	d.waiting[key] = m
	d.mu.Unlock()
	return m, rec
}

// acknowledged is told that the session owning key acknowledged its
// message: the last of a PUBLISH's sessions to do so releases its hold. It
// reports whether the message may be in the store (its write was taken),
// so it must be deleted.
func (d *durableHook) acknowledged(key string) bool {
	d.mu.Lock()
	m, ok := d.waiting[key]
	if ok {
		delete(d.waiting, key)
		if h := m.hold; h != nil {
			h.pending--
			if h.pending == 0 && h.acked != nil {
				close(h.acked)
			}
		}
	}
	d.mu.Unlock()
	if ok && m.state.CompareAndSwap(msgQueued, msgAcked) {
		d.coalesced.Add(1)
		return false
	}
	return true
}

// OnPublishHold returns what cl's PUBLISH waits for before its PUBACK or
// PUBREC: the commit of its writes to persistent sessions, if any.
func (d *durableHook) OnPublishHold(cl *mqtt.Client, pk packets.Packet) func() error {
	v, ok := d.pubs.Load(cl.ID)
	if !ok {
		return nil
	}
	s := v.(*pubSlot)
	if s.cl != cl {
		// A connection taken over while its PUBLISH was in progress: the
		// slot is the new connection's (the old one's acknowledgement
		// goes nowhere; its client publishes again).
		return nil
	}
	s.collecting.Store(false)
	if s.h.Load() == nil {
		// Wrote nothing durable: the common case, without d.mu. (A hold
		// made from here on, by a message relayed under the same origin
		// on another goroutine, is not this PUBLISH's: no one waits on it
		// and the next PUBLISH drops it.)
		return nil
	}
	d.mu.Lock()
	h := s.h.Swap(nil)
	if h == nil || (!h.set && h.err == nil) {
		d.mu.Unlock()
		return nil
	}
	h.pending--
	var acked <-chan struct{}
	if !h.commit && h.err == nil {
		if h.pending == 0 {
			// Every session it was written for acknowledged it already.
			d.mu.Unlock()
			return nil
		}
		h.acked = make(chan struct{})
		acked = h.acked
	}
	err, t := h.err, h.t
	d.mu.Unlock()
	return func() error {
		if err != nil {
			return err
		}
		return t.WaitOr(d.ctx, acked)
	}
}

// OnQosPublish writes a QoS 1/2 message newly held for a persistent
// session (resends, marked Dup, are written already), and the PUBREL step
// of a QoS 2 message the session received (PUBREC read, mochi patch 39):
// a restored session must send the PUBREL again, never the PUBLISH
// [MQTT-4.3.3-6].
func (d *durableHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, _ int) {
	if pk.FixedHeader.Type == packets.Pubrel && persistent(cl) {
		_, _ = d.put(durOp{kind: opMsgRel, client: cl.ID, pid: pk.PacketID})
		return
	}
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Dup || !persistent(cl) {
		return
	}
	key := msgKey(cl.ID, pk.PacketID)
	m := &msgDoc{ID: key, Client: cl.ID, Seq: d.seq.Add(1), PID: pk.PacketID, pk: pk,
		Origin: pk.Origin, Created: pk.Created, SubIDs: pk.Properties.SubscriptionIdentifier}
	if pk.Expiry > 0 {
		m.Expiry = pk.Expiry
	}
	h, rec := d.expect(pk.Origin, key, cl.ID, pk.PacketID)
	if rec {
		_, _ = d.put(durOp{kind: opPID, client: cl.ID, pid: pk.PacketID})
	}
	t, err := d.put(durOp{kind: opMsg, client: cl.ID, pid: pk.PacketID, msg: m, held: h})
	d.record(pk.Origin, t, err, false)
}

// Packet IDs across a restart or a node death. The node that restores a
// session from the store (a restart, an adoption) does not know the packet
// IDs the session's last node assigned since its last write: a QoS 2
// message delivered and PUBREC'd within the write-behind window, never
// stored, leaves its ID held by the client until a PUBREL that no node
// will send; a new message under that ID is taken by the client for a
// duplicate of it and discarded [MQTT-4.3.3-9] (lost after its PUBACK).
// And a node only suspected dead, which comes back, may still delete a
// stored message by client and packet ID. So each node records in the
// session document a packet ID it assigned once per pidBlock IDs, queued
// with the message that crossed into a new block (one write per pidBlock
// messages of a session, not one per message), and a restorer goes on
// 2 × pidBlock after the recorded one: beyond every ID the last node used,
// unless it assigned more than pidBlock IDs to the one session within a
// commit window.
const pidBlock = 1024

// recordPIDLocked reports whether pid, assigned to client id's message,
// is to be recorded as the session's packet ID counter (opPID): when it is
// in another block than the last one recorded here. d.mu is held.
func (d *durableHook) recordPIDLocked(id string, pid uint16) bool {
	last, ok := d.pids[id]
	if ok && last/pidBlock == pid/pidBlock {
		return false
	}
	d.pids[id] = pid
	return true
}

// pidResume is the packet ID counter a session restored from the store
// goes on from: 2 × pidBlock past the recorded pid (IDs run from 1 to
// 65535, then wrap). 0 (none recorded, a document of an older release):
// the restorer's own counter, as before.
func pidResume(pid uint16) uint32 {
	if pid == 0 {
		return 0
	}
	return (uint32(pid)+2*pidBlock-1)%65535 + 1
}

// OnQosComplete deletes a message the subscriber acknowledged (PUBACK or
// PUBCOMP read from it: mochi also reports the completion of a client's own
// QoS 1 PUBLISH, with the PUBACK it built, which has Created set).
func (d *durableHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	t := pk.FixedHeader.Type
	if (t != packets.Puback && t != packets.Pubcomp) || pk.Created != 0 || !persistent(cl) {
		return
	}
	if d.acknowledged(msgKey(cl.ID, pk.PacketID)) {
		_, _ = d.put(durOp{kind: opMsgDel, client: cl.ID, pid: pk.PacketID})
	}
}

// OnQosDropped deletes a held message that expired or was dropped. Not
// for a client taken over: its messages moved with its session (to
// another node, or to its new connection here), and their stored copies
// now belong to the session there.
func (d *durableHook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if persistent(cl) && !cl.IsTakenOver() {
		// Not delivered: its publisher's acknowledgement no longer waits
		// for this session (the message is dropped and counted), only for
		// the commit.
		d.mu.Lock()
		delete(d.waiting, msgKey(cl.ID, pk.PacketID))
		d.mu.Unlock()
		_, _ = d.put(durOp{kind: opMsgDel, client: cl.ID, pid: pk.PacketID})
	}
}

// OnSessionEstablish discards the stored session of a client that starts
// clean, before mochi installs the new one: messages queued for the new
// session from then on are written after the delete.
func (d *durableHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	d.mu.Lock()
	delete(d.gone, cl.ID) // back here
	d.establishing[cl.ID] = cl
	replay := d.sweepEstablishingLocked()
	d.mu.Unlock()
	d.replaySkipped(replay...)
	if !pk.Connect.Clean {
		d.claimOnConnect(cl)
		return
	}
	d.mu.Lock()
	known := d.known[cl.ID]
	delete(d.known, cl.ID)
	delete(d.epoch, cl.ID)
	delete(d.pids, cl.ID)
	d.mu.Unlock()
	if known {
		_, _ = d.put(durOp{kind: opSessionDel, client: cl.ID})
	}
}

func (d *durableHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	d.mu.Lock()
	if d.establishing[cl.ID] == cl {
		delete(d.establishing, cl.ID)
	}
	// cl's writes below supersede an older connection's end, whichever
	// connection it was left to (one cl took over may have been).
	delete(d.skipped, cl.ID)
	pre, written := d.preWritten[cl]
	delete(d.preWritten, cl)
	d.mu.Unlock()
	if persistent(cl) {
		// With what it inherited, unless storeWill wrote that already
		// before the CONNACK: a second write of the same document would
		// double the store's work in a connect storm.
		if !written || !sameSubs(pre, cl.State.Subscriptions.GetAll()) {
			_, _ = d.writeSession(cl, true)
		}
		return
	}
	if willOnly(cl) {
		// Written for its will only, before the CONNACK (storeWill): the
		// node that adopts this one's clients, should it die, publishes it.
		return
	}
	d.mu.Lock()
	known := d.known[cl.ID]
	delete(d.known, cl.ID)
	delete(d.epoch, cl.ID)
	delete(d.pids, cl.ID)
	d.mu.Unlock()
	if known {
		_, _ = d.put(durOp{kind: opSessionDel, client: cl.ID})
	}
}

// sameSubs reports whether a and b hold the same subscriptions, as a
// session document stores them.
func sameSubs(a, b map[string]packets.Subscription) bool {
	if len(a) != len(b) {
		return false
	}
	for f, x := range a {
		y, ok := b[f]
		if !ok || x.Qos != y.Qos || x.NoLocal != y.NoLocal || x.RetainAsPublished != y.RetainAsPublished ||
			x.RetainHandling != y.RetainHandling || x.Identifier != y.Identifier {
			return false
		}
	}
	return true
}

// OnSubscribe notes which filters of a persistent client's SUBSCRIBE it
// holds already, and with which options, before mochi replaces them: a
// refused SUBSCRIBE (OnSubscribed) must leave those as they were.
func (d *durableHook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if !persistent(cl) {
		return pk
	}
	var prior map[string]packets.Subscription
	for _, sub := range pk.Filters {
		if old, ok := cl.State.Subscriptions.Get(sub.Filter); ok {
			if prior == nil {
				prior = map[string]packets.Subscription{}
			}
			prior[sub.Filter] = old
		}
	}
	d.mu.Lock()
	if prior != nil {
		d.prior[cl] = prior
	} else {
		delete(d.prior, cl)
	}
	d.mu.Unlock()
	return pk
}

// OnSubscribed writes the session of a persistent client with its new
// subscriptions and holds the SUBACK (mochi writes it after this hook)
// until that write is committed, at most durableSubscribeMax: a SUBACK
// promises that the subscription outlives the node (docs/clustering.md,
// "Durability"), and the messages a publisher is told are safe reach it
// only if the adopter finds the subscription. When the store does not
// confirm in time, or the write was refused because another node owns the
// stored session (a move's source whose late write landed first, until
// movedIn takes it over), the SUBSCRIBE is refused with 0x80 (MQTT 3.1.1:
// Failure), so the client knows to subscribe again: its new filters are
// removed again, and a filter it held already keeps the subscription it
// had, with the options it had: 0x80 says the subscription was not
// accepted, and MQTT replaces an existing subscription only with one
// accepted [MQTT-3.8.4-3]; the one it had was acknowledged (stored), and
// removing it would lose what that SUBACK promised.
// SUBSCRIBEs are rare beside PUBLISHes: waiting on the client's read loop
// costs the publish path nothing.
func (d *durableHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if !persistent(cl) {
		return
	}
	d.mu.Lock()
	prior := d.prior[cl]
	delete(d.prior, cl)
	d.mu.Unlock()
	var notOwned atomic.Bool
	t, err := d.writeSessionRefused(cl, !cl.Closed(), &notOwned)
	if err == nil {
		err = d.waitSession(t, &notOwned)
	}
	if err == nil {
		return
	}
	refused := 0
	for i, sub := range pk.Filters {
		if i >= len(codes) || codes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		codes[i] = packets.ErrUnspecifiedError.Code
		refused++
		if old, ok := prior[sub.Filter]; ok {
			// Not through SubscribeClient: that would send the
			// filter's retained messages again.
			d.b.mq.Topics.Subscribe(cl.ID, old)
			cl.State.Subscriptions.Add(old.Filter, old)
			continue
		}
		d.b.mq.UnsubscribeClientFilter(cl, sub.Filter)
	}
	d.subscribeRefused.Add(int64(refused))
	d.log.Warn("subscriptions refused: the session was not stored", "client", cl.ID, "filters", refused, "error", err)
	// The document queued with them is written once the store is back:
	// this one, queued after it, takes them out again.
	_, _ = d.writeSession(cl, !cl.Closed())
}

// OnUnsubscribed writes the session without the filters of a client's
// UNSUBSCRIBE and holds the UNSUBACK until that is committed (bounded as a SUBACK's): a node that
// dies right after must not hand an adopter the old subscriptions. An
// UNSUBSCRIBE cannot be refused once done, so a timeout only logs; the
// write is still queued.
func (d *durableHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !persistent(cl) || pk.PacketID == 0 {
		// PacketID 0: mochi's UnsubscribeClient, as a session ends (its
		// delete is queued already), moves to another node or is taken
		// over here: whoever holds it next writes it (and this goroutine
		// may not be the client's: its will is not to be read here).
		return
	}
	var refused atomic.Bool
	t, err := d.writeSessionRefused(cl, !cl.Closed(), &refused)
	if err == nil {
		err = d.waitSession(t, &refused)
	}
	if err != nil {
		d.log.Warn("UNSUBACK sent before the session was stored", "client", cl.ID, "error", err)
	}
}

// durableSubscribeMax bounds how long a SUBACK (or UNSUBACK) of a
// persistent session waits for its session document's commit: well above
// a healthy store's commit (durableMinAge plus a batch), short enough that
// a client whose store is down hears so before its own timeout.
const durableSubscribeMax = 5 * time.Second

// errSessionNotOwned: a session write was refused because another node
// owns the stored session (the document was not written).
var errSessionNotOwned = errors.New("the stored session belongs to another node")

// waitSession waits for a session write's commit, at most
// d.subscribeWait (durableSubscribeMax); refused is the write's flag.
func (d *durableHook) waitSession(t writebehind.Ticket, refused *atomic.Bool) error {
	wait := durableSubscribeMax
	if w := d.subscribeWait.Load(); w > 0 {
		wait = time.Duration(w)
	}
	ctx, cancel := context.WithTimeout(d.ctx, wait)
	defer cancel()
	if err := t.Wait(ctx); err != nil {
		return fmt.Errorf("session not stored within %s: %w", wait, err)
	}
	if refused.Load() {
		return errSessionNotOwned
	}
	return nil
}

func (d *durableHook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	d.dropSlot(cl) // its PUBLISHes are over, whatever its end writes
	if f := d.testOnDisconnect.Load(); f != nil {
		(*f)(cl)
	}
	if cl.IsTakenOver() {
		// The new connection (here or on another node) writes it. A
		// connection whose CONNACK failed (mochi patch 115) and that was
		// taken over before this leaves what storeWill wrote for it.
		d.mu.Lock()
		delete(d.preWritten, cl)
		d.mu.Unlock()
		return
	}
	d.mu.Lock()
	est, establishing := d.establishing[cl.ID]
	if establishing && est == cl {
		// Its CONNACK could not be written (mochi patch 115: cl ends
		// here, without its will, which mochi cleared). The writes left
		// to it by an older connection's end are made first, then cl's
		// own end supersedes them.
		s := d.notEstablishedLocked(cl)
		d.mu.Unlock()
		d.replaySkipped(s)
		d.disconnected(cl, expire)
		return
	}
	if establishing {
		// A newer connection establishing here may not have marked cl
		// taken over yet, and has written its will before its CONNACK
		// (storeWill): a write of cl's now would replace it (or delete
		// it). Should the newer one not be established after all (a
		// hook refuses it, or its CONNACK fails), cl's session stays
		// and this write is made then (skippedLocked).
		d.skippedLocked(cl, est).disconnect(expire)
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	d.disconnected(cl, expire)
}

// disconnected makes the store writes of the end of cl's connection.
func (d *durableHook) disconnected(cl *mqtt.Client, expire bool) {
	if expire || !persistent(cl) {
		d.mu.Lock()
		known := d.known[cl.ID]
		delete(d.known, cl.ID)
		delete(d.epoch, cl.ID)
		delete(d.pids, cl.ID)
		d.mu.Unlock()
		if known {
			_, _ = d.put(durOp{kind: opSessionDel, client: cl.ID})
		}
		return
	}
	_, _ = d.writeSession(cl, false)
}

// OnWillSent clears the will of the stored session once it is published,
// unless the will was a connection's that another connection of the same
// client ID took over (MQTT 5 publishes the old connection's will): the
// stored document holds the new connection's will by then, or soon (its
// storeWill and session writes), and clearing it after them would leave
// a node death nothing to publish.
func (d *durableHook) OnWillSent(cl *mqtt.Client, _ packets.Packet) {
	if cl.IsTakenOver() {
		return
	}
	if cur, ok := d.b.mq.Clients.Get(cl.ID); ok && cur != cl {
		return // replaced by a newer connection
	}
	d.mu.Lock()
	if est, establishing := d.establishing[cl.ID]; establishing && est != cl {
		// Not now (see OnDisconnect): once est is refused or fails.
		d.skippedLocked(cl, est).willSent = true
		d.mu.Unlock()
		return
	}
	known := d.known[cl.ID]
	d.mu.Unlock()
	if known {
		_, _ = d.put(durOp{kind: opWillCleared, client: cl.ID})
	}
}

// skippedEnd: the store writes of the end of connection cl that were
// left to the newer connection by, establishing here.
//
// Why not skip only when by will inherit cl's session (cl in Clients,
// persistent): by may still be refused after that check (the cluster
// hook's claim or move, the owner unreachable, an older CONNECT refused
// for a newer one), and then nothing would write cl's end, ever: the
// stored document keeps connected=true and a will cl cancelled (a node
// death publishes it), or a will-only record owned here that makes
// another node refuse the client's persistent session. Remembering the
// skipped writes and making them once by is known not to be established
// is exact in both outcomes.
type skippedEnd struct {
	by, cl       *mqtt.Client
	disconnected bool // OnDisconnect skipped, with expire
	expire       bool
	willSent     bool // OnWillSent skipped
	// failed: cl's own end, its CONNECT failed after the hooks ran
	// (sweepEstablishingLocked): its will is cleared, never published.
	failed bool
}

func (s *skippedEnd) disconnect(expire bool) { s.disconnected, s.expire = true, expire }

// skippedLocked returns the skipped writes of cl, left to by (d.mu held).
// A client ID has one at a time: by is the newest connection
// establishing, and an older connection's end is superseded by cl's.
func (d *durableHook) skippedLocked(cl, by *mqtt.Client) *skippedEnd {
	s := d.skipped[cl.ID]
	if s == nil || s.cl != cl {
		s = &skippedEnd{cl: cl}
		d.skipped[cl.ID] = s
	}
	s.by = by
	return s
}

// notEstablishedLocked ends the establishment of cl, which will not be
// established (refused, or its CONNACK failed), and returns the skipped
// writes it was left, to make now (replaySkipped, d.mu released) unless a
// newer connection of the ID is establishing here: they are left to that
// one then.
func (d *durableHook) notEstablishedLocked(cl *mqtt.Client) *skippedEnd {
	if d.establishing[cl.ID] == cl {
		delete(d.establishing, cl.ID)
	}
	delete(d.preWritten, cl)
	s := d.skipped[cl.ID]
	if s == nil || s.by != cl {
		return nil
	}
	if est, ok := d.establishing[cl.ID]; ok {
		s.by = est
		return nil
	}
	delete(d.skipped, cl.ID)
	return s
}

// replaySkipped makes the skipped writes of ends (entries may be nil).
func (d *durableHook) replaySkipped(ends ...*skippedEnd) {
	for _, s := range ends {
		if s == nil {
			continue
		}
		if s.willSent {
			d.mu.Lock()
			known := d.known[s.cl.ID]
			d.mu.Unlock()
			if known {
				_, _ = d.put(durOp{kind: opWillCleared, client: s.cl.ID})
			}
		}
		if s.disconnected {
			d.disconnected(s.cl, s.expire)
		}
		if s.failed && !s.expire && persistent(s.cl) {
			// After the session write above: within its batch it clears
			// that document's will, in a later one the stored will.
			_, _ = d.put(durOp{kind: opWillCleared, client: s.cl.ID})
		}
	}
}

// expires reports whether cl's session ends with its connection, as mochi
// decides it for OnDisconnect.
func expires(cl *mqtt.Client) bool {
	return (cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryInterval == 0) ||
		(cl.Properties.ProtocolVersion < 5 && cl.Properties.Clean)
}

// sweepEstablishingLocked drops, at most once per establishSweepEvery,
// the connections that ended after the hooks ran with no further hook
// call. Since mochi patches 115 and 116 a failed CONNACK (OnDisconnect)
// or resend (OnSessionEstablished, then OnDisconnect) ends its
// establishment through the hooks; what is left to the sweep is a panic
// recovered in the connect phase, which stops the connection and calls
// no hook (PATCHES.md, "Known, not fixed"): without the sweep its entry
// would hold back the end of every older connection of the ID. A closed
// connection establishing is such a one (or, rarely, one taken over by a
// newer one right after its inheritance: its OnSessionEstablished then
// writes its session in full). Returns the skipped writes to make (d.mu
// held).
func (d *durableHook) sweepEstablishingLocked() []*skippedEnd {
	now := time.Now()
	if now.Sub(d.establishSwept) < d.establishSweepEvery {
		return nil
	}
	d.establishSwept = now
	var replay []*skippedEnd
	for _, cl := range d.establishing {
		if cl.Closed() {
			replay = append(replay, d.notEstablishedLocked(cl))
			if !cl.IsTakenOver() {
				// Its CONNECT failed after storeWill and mochi's takeover,
				// and no hook said so: cl holds the session (the
				// connection it took over wrote nothing, IsTakenOver), and
				// the store has it connected, with cl's will. Its end is
				// written as OnDisconnect's would be, without the will: cl
				// was never established, so a node death must not publish
				// it. (A connection taken over: the newer one writes.)
				replay = append(replay, &skippedEnd{cl: cl, disconnected: true, expire: expires(cl), failed: true})
			}
		}
	}
	for cl := range d.preWritten {
		if cl.Closed() {
			delete(d.preWritten, cl)
		}
	}
	for _, s := range d.skipped {
		if s.by.Closed() {
			replay = append(replay, d.notEstablishedLocked(s.by))
		}
	}
	return replay
}

// sweepEstablishingLoop sweeps (sweepEstablishingLocked) every
// establishSweepEvery until the hook closes, while there is anything to
// sweep: CONNECTs sweep too, but a quiet node would otherwise keep a
// failed connection's store writes (its end, an older connection's) for
// as long as no client connects, and a node death meanwhile publishes a
// will that was cancelled, published already, or never established.
func (d *durableHook) sweepEstablishingLoop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		var replay []*skippedEnd
		d.mu.Lock()
		if len(d.establishing)+len(d.preWritten)+len(d.skipped) > 0 {
			replay = d.sweepEstablishingLocked()
		}
		d.mu.Unlock()
		d.replaySkipped(replay...)
	}
}

func (d *durableHook) OnClientExpired(cl *mqtt.Client) {
	d.mu.Lock()
	delete(d.known, cl.ID)
	delete(d.epoch, cl.ID)
	delete(d.pids, cl.ID)
	d.mu.Unlock()
	_, _ = d.put(durOp{kind: opSessionDel, client: cl.ID})
}

// OnRetainMessage writes a retained message set (or cleared) by a client
// here; the PUBLISH's acknowledgement waits for it. Peers write their own.
func (d *durableHook) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, _ int64) {
	if len(pk.TopicName) >= 4 && pk.TopicName[:4] == "$SYS" {
		return
	}
	r := &retainedDoc{Topic: pk.TopicName, Stamp: time.Now().UnixNano(), Node: d.node, Cleared: len(pk.Payload) == 0}
	if !r.Cleared {
		var w wbuf
		if err := appendPacket(&w, pk); err != nil {
			d.log.Error("retained message not written: cannot encode it", "topic", pk.TopicName, "error", err)
			return
		}
		r.Packet = w.b
		r.Expiry = pk.Expiry
	}
	t, err := d.put(durOp{kind: opRetain, ret: r})
	if cl != nil {
		d.record(cl.ID, t, err, true)
	}
}

// writeSession queues cl's session document as it is now.
func (d *durableHook) writeSession(cl *mqtt.Client, connected bool) (writebehind.Ticket, error) {
	return d.writeSessionRefused(cl, connected, nil)
}

// writeSessionRefused is writeSession, with refused set once its batch is
// committed if the document was refused as another node's.
func (d *durableHook) writeSessionRefused(cl *mqtt.Client, connected bool, refused *atomic.Bool) (writebehind.Ticket, error) {
	return d.queueSession(cl, cl.State.Subscriptions.GetAll(), connected, refused, false)
}

// queueSession queues cl's session document with the subscriptions subs
// (those cl holds, or, before its CONNACK, those it is about to inherit),
// with PutNow if now: a client's answer waits for the write.
func (d *durableHook) queueSession(cl *mqtt.Client, subs map[string]packets.Subscription, connected bool, refused *atomic.Bool, now bool) (writebehind.Ticket, error) {
	doc := &sessionDoc{ID: cl.ID, Owner: d.node, Proto: cl.Properties.ProtocolVersion, Connected: connected, Updated: time.Now().UTC(),
		WillOnly: !persistent(cl)}
	if cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryIntervalFlag {
		doc.Expiry, doc.ExpirySet = cl.Properties.Props.SessionExpiryInterval, true
	}
	if !doc.WillOnly {
		for _, sub := range subs {
			doc.Subs = append(doc.Subs, subDoc{Filter: sub.Filter, Qos: sub.Qos, NoLocal: sub.NoLocal,
				RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling, Identifier: sub.Identifier})
		}
	}
	if !connected {
		doc.DisconnectedAt = cl.StopTime()
		if doc.DisconnectedAt == 0 {
			doc.DisconnectedAt = time.Now().Unix()
		}
	}
	if w := cl.Properties.Will; atomic.LoadUint32(&cl.Properties.Will.Flag) == 1 {
		wd := &willDoc{Topic: w.TopicName, Payload: w.Payload, Qos: w.Qos, Retain: w.Retain, Delay: w.WillDelayInterval}
		for _, u := range w.User {
			wd.User = append(wd.User, [2]string{u.Key, u.Val})
		}
		doc.Will = wd
	}
	d.mu.Lock()
	doc.fresh = !d.known[cl.ID]
	d.known[cl.ID] = true
	delete(d.unstored, cl.ID) // this one supersedes it
	own := d.epoch[cl.ID]
	doc.Epoch, doc.AdoptedFrom, doc.AdoptedAt, doc.AdoptedEarlier = max(own.epoch, 1), own.from, own.at, own.earlier
	doc.PID = d.pids[cl.ID] // the document is written whole: the record stays
	d.mu.Unlock()
	op := durOp{kind: opSession, client: cl.ID, sess: doc, refused: refused}
	if now {
		return d.w.PutNow(d.ctx, op)
	}
	return d.put(op)
}

// write stores one batch. Within it, a message acknowledged before the
// batch was written is not written at all, only the last state of a
// session document is, and a session deleted drops the batch's earlier
// writes for it. Deletes go first (a session wiped, or a packet ID freed
// for reuse, precedes the writes after it), then replaces, inserts and upserts.
// Every step is idempotent, so a failed batch is written again whole.
func (d *durableHook) write(ctx context.Context, batch []durOp) error {
	var (
		sessDel   []string
		msgDel    []string
		msgRel    = map[string]bool{} // stored messages to mark at their PUBREL step
		msgs      []*msgDoc
		msgAt     = map[string]int{}
		sessUp    = map[string]*sessionDoc{}
		sessOrder []string
		willClr   []string
		pidUp     = map[string]uint16{}
		rets      = map[string]*retainedDoc{}
		refused   []string // session documents not written: another node's
	)
	var takes []durOp
	d.mu.Lock()
	gone := len(d.gone) > 0
	for i, op := range batch {
		if _, g := d.gone[op.client]; gone && g && (op.kind == opSession || op.kind == opWillCleared) {
			batch[i].kind = opSkip
		}
	}
	d.mu.Unlock()
	for _, op := range batch {
		switch op.kind {
		case opSessionTake:
			takes = append(takes, op)
		case opSessionDel:
			for i, m := range msgs {
				if m != nil && m.Client == op.client {
					msgs[i] = nil
					delete(msgAt, m.ID)
				}
			}
			delete(sessUp, op.client)
			delete(pidUp, op.client)
			sessDel = append(sessDel, op.client)
		case opMsg:
			if h := op.held; h != nil && h.state.Load() != msgTaken && !h.state.CompareAndSwap(msgQueued, msgTaken) {
				continue // acknowledged while queued
			}
			msgAt[op.msg.ID] = len(msgs)
			msgs = append(msgs, op.msg)
			delete(msgRel, op.msg.ID)
		case opMsgRel:
			k := msgKey(op.client, op.pid)
			if i, ok := msgAt[k]; ok {
				msgs[i].Rel = true // inserted by this batch: marked already
			} else {
				msgRel[k] = true
			}
		case opMsgDel:
			k := msgKey(op.client, op.pid)
			delete(msgRel, k)
			if i, ok := msgAt[k]; ok {
				msgs[i] = nil
				delete(msgAt, k)
				d.coalesced.Add(1)
				continue
			}
			msgDel = append(msgDel, k)
		case opSession:
			_, ok := sessUp[op.client]
			if op.redo {
				// Older than any other document of the client queued
				// since (those removed the entry): written only if none was.
				d.mu.Lock()
				current := d.unstored[op.client] == op.sess
				d.mu.Unlock()
				if ok || !current {
					continue
				}
			}
			if !ok {
				sessOrder = append(sessOrder, op.client)
			}
			sessUp[op.client] = op.sess
			delete(pidUp, op.client) // it holds the latest record
		case opPID:
			if s, ok := sessUp[op.client]; ok {
				s.PID = op.pid
			} else {
				pidUp[op.client] = op.pid
			}
		case opWillCleared:
			if s, ok := sessUp[op.client]; ok {
				s.Will = nil
			} else {
				willClr = append(willClr, op.client)
			}
		case opRetain:
			if r, ok := rets[op.ret.Topic]; !ok || op.ret.Stamp > r.Stamp {
				rets[op.ret.Topic] = op.ret
			}
		}
	}
	db := d.st.DB()
	sc, mc := db.Collection(store.CollSessions), db.Collection(store.CollSessionMessages)
	// Take-overs first: the writes of the session here that follow them
	// (this batch's, or later ones) then find it this node's.
	for _, op := range takes {
		if err := d.takeStored(ctx, sc, op.client, op.from); err != nil {
			return fmt.Errorf("take over sessions: %w", err)
		}
	}
	if len(sessDel) > 0 {
		mine, _, err := d.owned(ctx, sc, sessDel)
		if err != nil {
			return fmt.Errorf("delete sessions: %w", err)
		}
		if err := deleteByID(ctx, sc, mine); err != nil {
			return fmt.Errorf("delete sessions: %w", err)
		}
		// By client: a scan (FerretDB v1 looks up only _id), once per
		// batch, for sessions ended clean, expired or cleared.
		if _, err := mc.DeleteMany(ctx, bson.D{{Key: "c", Value: bson.D{{Key: "$in", Value: sessDel}}}}); err != nil {
			return fmt.Errorf("delete session messages: %w", err)
		}
	}
	if err := deleteByID(ctx, mc, msgDel); err != nil {
		return fmt.Errorf("delete session messages: %w", err)
	}
	var ins []any
	for _, m := range msgs {
		if m == nil {
			continue
		}
		if m.Packet == nil {
			var w wbuf
			if err := appendPacket(&w, m.pk); err != nil {
				d.log.Error("message for a persistent session not written: cannot encode it", "client", m.Client, "topic", m.pk.TopicName, "error", err)
				continue
			}
			m.Packet = w.b
		}
		ins = append(ins, m)
	}
	if len(ins) > 0 {
		if _, err := mc.InsertMany(ctx, ins, options.InsertMany().SetOrdered(false)); err != nil {
			if !onlyDuplicates(err) {
				return fmt.Errorf("insert session messages: %w", err)
			}
			// A document under the same client and packet ID: this batch
			// written before (the same message), or an older message whose
			// delete never landed (a node that died before writing it).
			// The session holds this message under the ID now: it replaces
			// the other, which a refused insert would have left in its place
			// while the publisher was told the message was stored.
			if err := replaceDuplicates(ctx, mc, ins, err); err != nil {
				return fmt.Errorf("insert session messages: %w", err)
			}
		}
	}
	if len(msgRel) > 0 {
		models := make([]mongo.WriteModel, 0, len(msgRel))
		for k := range msgRel {
			models = append(models, mongo.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: k}}).
				SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "rel", Value: true}}}}))
		}
		if err := store.BulkWrite(ctx, mc, models, false); err != nil {
			return fmt.Errorf("mark session messages released: %w", err)
		}
	}
	if len(sessOrder) > 0 {
		// Rewritten as a whole, each document by one replace of it in
		// place (by _id, where this node owns it): one SQLite UPDATE of
		// the row in FerretDB, so no moment leaves the session without a
		// document. (A delete, then an insert, did: a node killed between
		// the two commands left none, and its restart or adopter lost the
		// session.) A document that another node owns now is not written
		// (refused, counted lost), one that is not there is inserted. The
		// replace costs FerretDB more than the two did (about 1.0 against
		// 0.65 ms a document of this shape, batches of 500; docs/clustering.md).
		//
		// Documents this node knew of none for when it queued them (a new
		// client's first, the will-only record of a connect storm) are
		// inserted first, without the lookup (owned): it costs FerretDB
		// more than the insert (2.2 against 1.2 ms a document, measured
		// with bench/durable -wills). Only those the insert finds there
		// already take the lookup.
		var ids, fresh []string
		for _, id := range sessOrder {
			if doc, ok := sessUp[id]; ok {
				if doc.fresh {
					fresh = append(fresh, id)
				} else {
					ids = append(ids, id)
				}
			}
		}
		if len(fresh) > 0 {
			docs := make([]any, 0, len(fresh))
			for _, id := range fresh {
				docs = append(docs, sessUp[id])
			}
			if _, err := sc.InsertMany(ctx, docs, options.InsertMany().SetOrdered(false)); err != nil {
				if !onlyDuplicates(err) {
					return fmt.Errorf("write sessions: %w", err)
				}
				ids = append(ids, duplicateIDs(docs, err)...)
			}
		}
		mine, others, err := d.ownedEpochs(ctx, sc, ids)
		if err != nil {
			return fmt.Errorf("write sessions: %w", err)
		}
		d.lost.Add(int64(len(others)))
		refused = others
		var (
			repl   []*sessionDoc
			absent []any
		)
		for _, id := range ids {
			doc := sessUp[id]
			epoch, ok := mine[id]
			switch {
			case slices.Contains(others, id):
			case !ok:
				absent = append(absent, doc)
			case epoch > doc.Epoch:
				// Raised by a take-over here (takeStored, movedIn) that
				// this node's epoch record (d.epoch) does not know of:
				// the stored epoch never goes back.
				c := *doc
				c.Epoch = epoch
				repl = append(repl, &c)
			default:
				repl = append(repl, doc)
			}
		}
		gone, err := replaceSessions(ctx, sc, repl)
		if err != nil {
			return fmt.Errorf("write sessions: %w", err)
		}
		if f := d.testSessionRewrite.Load(); f != nil && len(repl) > 0 {
			rids := make([]string, len(repl))
			for i, doc := range repl {
				rids[i] = doc.ID
			}
			(*f)(rids)
		}
		for _, id := range gone {
			absent = append(absent, sessUp[id])
		}
		if len(absent) > 0 {
			if _, err := sc.InsertMany(ctx, absent, options.InsertMany().SetOrdered(false)); err != nil {
				if !onlyDuplicates(err) {
					return fmt.Errorf("write sessions: %w", err)
				}
				d.lost.Add(int64(duplicateCount(err)))
				refused = append(refused, duplicateIDs(absent, err)...)
			}
		}
	}
	if len(willClr) > 0 {
		mine, _, err := d.owned(ctx, sc, willClr)
		if err != nil {
			return fmt.Errorf("write sessions: %w", err)
		}
		var models []mongo.WriteModel
		for _, id := range mine {
			models = append(models, mongo.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: id}}).
				SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "will", Value: nil}}}}))
		}
		if len(models) > 0 {
			if err := store.BulkWrite(ctx, sc, models, false); err != nil {
				return fmt.Errorf("write sessions: %w", err)
			}
		}
	}
	if len(pidUp) > 0 {
		ids := slices.Collect(maps.Keys(pidUp))
		mine, _, err := d.owned(ctx, sc, ids)
		if err != nil {
			return fmt.Errorf("write sessions: %w", err)
		}
		models := make([]mongo.WriteModel, 0, len(mine))
		for _, id := range mine {
			models = append(models, mongo.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: id}}).
				SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "pid", Value: pidUp[id]}}}}))
		}
		if len(models) > 0 {
			if err := store.BulkWrite(ctx, sc, models, false); err != nil {
				return fmt.Errorf("write sessions: %w", err)
			}
		}
	}
	if len(rets) > 0 {
		var models []mongo.WriteModel
		for _, r := range rets {
			newer := bson.D{{Key: "$or", Value: bson.A{
				bson.D{{Key: "stamp", Value: bson.D{{Key: "$lt", Value: r.Stamp}}}},
				bson.D{{Key: "stamp", Value: r.Stamp}, {Key: "node", Value: bson.D{{Key: "$lt", Value: r.Node}}}},
			}}}
			models = append(models, mongo.NewUpdateOneModel().
				SetFilter(append(bson.D{{Key: "_id", Value: r.Topic}}, newer...)).
				SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "stamp", Value: r.Stamp}, {Key: "node", Value: r.Node},
					{Key: "cleared", Value: r.Cleared}, {Key: "pk", Value: r.Packet}, {Key: "expiry", Value: r.Expiry}}}}).
				SetUpsert(true))
		}
		if err := store.BulkWrite(ctx, db.Collection(store.CollRetained), models, false); err != nil && !onlyDuplicates(err) {
			return fmt.Errorf("write retained messages: %w", err)
		}
	}
	// Committed: the holds of the messages written wait for this batch's
	// ticket now, no longer for their sessions' acknowledgements.
	d.mu.Lock()
	for id, doc := range sessUp {
		if slices.Contains(refused, id) {
			d.unstored[id] = doc
		} else if d.unstored[id] != nil {
			delete(d.unstored, id)
		}
	}
	d.mu.Unlock()
	for _, op := range batch {
		if op.kind == opSession && op.refused != nil && slices.Contains(refused, op.client) {
			op.refused.Store(true)
		}
	}
	d.mu.Lock()
	for _, op := range batch {
		if op.kind == opMsg && op.held != nil {
			if k := op.msg.ID; d.waiting[k] == op.held {
				delete(d.waiting, k)
			}
		}
	}
	d.mu.Unlock()
	return nil
}

// takeStored makes this node the owner of client id's stored session if
// node from owns it (a conditional update, the epoch raised). When from's
// document is not there yet (its write still queued there), movedIn goes
// on trying in the background.
//
// Read, then written, by _id alone (as owned does): FerretDB v1 scans the
// collection for a filter on _id and owner, and this runs on the writer's
// goroutine.
func (d *durableHook) takeStored(ctx context.Context, sc *mongo.Collection, id, from string) error {
	var doc struct {
		Owner string `bson:"owner"`
	}
	err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: id}}, options.FindOne().SetProjection(bson.D{{Key: "owner", Value: 1}})).Decode(&doc)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		d.movedIn(id, from)
		return nil
	case err != nil:
		return err
	case doc.Owner != from:
		return nil // this node's already, or a third node's (an adoption)
	}
	_, err = sc.UpdateOne(ctx, bson.D{{Key: "_id", Value: id}}, d.takeUpdate(id))
	return err
}

// takeOver queues the take-over of client id's stored session from node
// from, whose session the client's CONNECT here just took (moved, or ended
// there for a clean start or an empty session): ahead of the session's
// own write here, so that write is not refused as another node's, and the
// source's document (with its will) does not stay behind under its name.
func (d *durableHook) takeOver(id, from string) {
	d.mu.Lock()
	delete(d.gone, id)
	d.known[id] = true // a clean client's establish then deletes it
	d.mu.Unlock()
	_, _ = d.put(durOp{kind: opSessionTake, client: id, from: from})
}

// gaveUp marks client id's session as handed to another node (see gone).
func (d *durableHook) gaveUp(id string) {
	now := time.Now()
	d.mu.Lock()
	d.gone[id] = now
	delete(d.known, id)
	delete(d.unstored, id)
	delete(d.epoch, id)
	delete(d.pids, id)
	if len(d.gone) > 1024 && now.Sub(d.goneSwept) > time.Minute {
		// Writes queued before a give-up are long written (or the store
		// has been down for goneKeep, and a stale write is the least of
		// it): the entry has done its work.
		d.goneSwept = now
		for k, at := range d.gone {
			if now.Sub(at) > goneKeep {
				delete(d.gone, k)
			}
		}
	}
	d.mu.Unlock()
}

// goneKeep is how long a session handed away skips the writes queued for
// it before.
const goneKeep = 10 * time.Minute

// owned sorts the stored sessions of ids into those this node owns and
// those another node does (absent ones are in neither). FerretDB v1 looks
// a document up by index only for a filter on _id alone: a filter on _id
// and owner, or on _id $in, scans the collection, once per id of the $in
// (10,000 sessions written in batches of 4,096 took minutes). So each is
// read by _id, then written by _id. Not atomic, but neither was FerretDB's
// conditional delete (a read, then a write); an adopter that takes a
// session in between has its insert refused (duplicate key), or this
// node's, and the later write here is refused as lost (insert), replaces
// the adopter's document (a rewrite: this node's, as before the adoption)
// or removes it (delete: a session this node ended).
func (d *durableHook) owned(ctx context.Context, sc *mongo.Collection, ids []string) (mine, others []string, err error) {
	epochs, others, err := d.ownedEpochs(ctx, sc, ids)
	if err != nil {
		return nil, nil, err
	}
	for _, id := range ids {
		if _, ok := epochs[id]; ok {
			mine = append(mine, id)
		}
	}
	return mine, others, nil
}

// ownedEpochs is owned, with the stored epoch of each session this node
// owns.
func (d *durableHook) ownedEpochs(ctx context.Context, sc *mongo.Collection, ids []string) (mine map[string]int64, others []string, err error) {
	proj := options.FindOne().SetProjection(bson.D{{Key: "owner", Value: 1}, {Key: "epoch", Value: 1}})
	mine = make(map[string]int64, len(ids))
	for _, id := range ids {
		var doc struct {
			Owner string `bson:"owner"`
			Epoch int64  `bson:"epoch"`
		}
		err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: id}}, proj).Decode(&doc)
		switch {
		case errors.Is(err, mongo.ErrNoDocuments):
		case err != nil:
			return nil, nil, err
		case doc.Owner == d.node:
			mine[id] = doc.Epoch
		default:
			others = append(others, id)
		}
	}
	return mine, others, nil
}

// replaceSessions replaces the stored session documents docs in place, by
// _id alone (the filter FerretDB v1 looks up by index: with owner as well
// it scans the collection, see owned), in commands of
// store.MaxStatementsPerCommand statements, and returns the IDs of those
// it found no document for (deleted since owned read it: rare, and read
// again only then).
func replaceSessions(ctx context.Context, sc *mongo.Collection, docs []*sessionDoc) (gone []string, err error) {
	for len(docs) > 0 {
		chunk := docs[:min(len(docs), store.MaxStatementsPerCommand)]
		docs = docs[len(chunk):]
		models := make([]mongo.WriteModel, len(chunk))
		for i, doc := range chunk {
			models[i] = mongo.NewReplaceOneModel().SetFilter(bson.D{{Key: "_id", Value: doc.ID}}).SetReplacement(doc)
		}
		res, err := sc.BulkWrite(ctx, models, options.BulkWrite().SetOrdered(false))
		if err != nil {
			return nil, err
		}
		if res.MatchedCount == int64(len(chunk)) {
			continue
		}
		for _, doc := range chunk {
			err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: doc.ID}}, options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Err()
			switch {
			case errors.Is(err, mongo.ErrNoDocuments):
				gone = append(gone, doc.ID)
			case err != nil:
				return nil, err
			}
		}
	}
	return gone, nil
}

// deleteByID deletes documents by _id, one statement each in one command:
// each looked up by the index (a $in would scan).
func deleteByID(ctx context.Context, c *mongo.Collection, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	models := make([]mongo.WriteModel, len(ids))
	for i, id := range ids {
		models[i] = mongo.NewDeleteOneModel().SetFilter(bson.D{{Key: "_id", Value: id}})
	}
	_, err := c.BulkWrite(ctx, models, options.BulkWrite().SetOrdered(false))
	return err
}

// onlyDuplicates reports a write error made only of duplicate keys: an
// insert written already (a batch written again), or a conditional upsert
// whose document exists and did not match (newer, or owned elsewhere).
func onlyDuplicates(err error) bool {
	var bwe mongo.BulkWriteException
	if errors.As(err, &bwe) {
		if bwe.WriteConcernError != nil || len(bwe.WriteErrors) == 0 {
			return false
		}
		for _, we := range bwe.WriteErrors {
			if we.Code != 11000 {
				return false
			}
		}
		return true
	}
	return mongo.IsDuplicateKeyError(err)
}

// replaceDuplicates writes again, as whole-document replacements, the
// documents of docs whose insert err refused as duplicate keys.
func replaceDuplicates(ctx context.Context, c *mongo.Collection, docs []any, err error) error {
	idx := make([]int, 0, len(docs))
	var bwe mongo.BulkWriteException
	if errors.As(err, &bwe) {
		for _, we := range bwe.WriteErrors {
			if we.Index < 0 || we.Index >= len(docs) {
				idx = idx[:0]
				break
			}
			idx = append(idx, we.Index)
		}
	}
	if len(idx) == 0 { // which ones is unknown: all
		for i := range docs {
			idx = append(idx, i)
		}
	}
	models := make([]mongo.WriteModel, 0, len(idx))
	for _, i := range idx {
		m := docs[i].(*msgDoc)
		models = append(models, mongo.NewReplaceOneModel().SetFilter(bson.D{{Key: "_id", Value: m.ID}}).SetReplacement(m).SetUpsert(true))
	}
	return store.BulkWrite(ctx, c, models, false)
}

// duplicateIDs returns the IDs of the session documents of docs whose
// insert err refused as duplicate keys (all, when it does not say which).
func duplicateIDs(docs []any, err error) []string {
	var ids []string
	var bwe mongo.BulkWriteException
	if errors.As(err, &bwe) {
		for _, we := range bwe.WriteErrors {
			if we.Index < 0 || we.Index >= len(docs) {
				ids = ids[:0]
				break
			}
			ids = append(ids, docs[we.Index].(*sessionDoc).ID)
		}
	}
	if len(ids) == 0 {
		for _, doc := range docs {
			ids = append(ids, doc.(*sessionDoc).ID)
		}
	}
	return ids
}

func duplicateCount(err error) int {
	var bwe mongo.BulkWriteException
	if errors.As(err, &bwe) {
		return len(bwe.WriteErrors)
	}
	return 1
}

// load restores the sessions this node owns and every retained message
// from the store, before clients connect. A session whose expiry passed
// while the node was down is deleted, its messages counted as dropped
// (session_expired); an expired message is counted (expired).
func (d *durableHook) load(ctx context.Context) (sessions, messages, retained int, err error) {
	db := d.st.DB()
	now := time.Now().Unix()
	maxExpiry := int64(d.b.cfg.SessionExpiry / time.Second)

	cur, err := db.Collection(store.CollSessions).Find(ctx, bson.D{{Key: "owner", Value: d.node}})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("read sessions: %w", err)
	}
	var docs []sessionDoc
	if err := cur.All(ctx, &docs); err != nil {
		return 0, 0, 0, fmt.Errorf("read sessions: %w", err)
	}
	n, err := d.restore(ctx, docs, now, maxExpiry, false, nil)
	if err != nil {
		return 0, 0, 0, err
	}
	messages = n

	cur, err = db.Collection(store.CollRetained).Find(ctx, bson.D{{Key: "cleared", Value: false}})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("read retained messages: %w", err)
	}
	var rets []retainedDoc
	if err := cur.All(ctx, &rets); err != nil {
		return 0, 0, 0, fmt.Errorf("read retained messages: %w", err)
	}
	for _, r := range rets {
		if r.Expiry > 0 && r.Expiry < now {
			continue
		}
		pk := readPacket(&rbuf{b: r.Packet})
		if pk.TopicName == "" {
			continue
		}
		pk.FixedHeader.Retain = true
		pk.Created = now
		pk.Expiry = r.Expiry
		d.b.mq.RetainFromPeer(pk)
		if d.b.cluster != nil {
			d.b.cluster.seedRetained(r.Topic, r.Stamp, r.Node)
		}
		retained++
	}
	return len(docs), messages, retained, nil
}

// restore installs sessions read from the store as offline sessions with
// their messages, wills and subscriptions (routes follow). Expired ones
// are deleted and their messages counted. adopted sessions were a dead
// node's: their clients' connections are gone, so a will still held fires.
//
// take, if set, is asked for each session just before it is installed
// (after its messages are read), and skips it when false: an adoption's
// conditional claim, so a session is in memory the moment it is owned.
func (d *durableHook) restore(ctx context.Context, docs []sessionDoc, now, maxExpiry int64, adopted bool, take func(*sessionDoc) bool) (int, error) {
	if len(docs) == 0 {
		return 0, nil
	}
	ids := make([]string, len(docs))
	for i, s := range docs {
		ids[i] = s.ID
	}
	held := map[string][]msgDoc{}
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	// Few sessions: looked up by client. Many: one pass over the
	// collection (FerretDB matches $in by scanning, once per query).
	var queries []bson.D
	if len(ids) <= 1000 {
		queries = append(queries, bson.D{{Key: "c", Value: bson.D{{Key: "$in", Value: ids}}}})
	} else {
		queries = append(queries, bson.D{})
	}
	for _, q := range queries {
		cur, err := d.st.DB().Collection(store.CollSessionMessages).Find(ctx, q)
		if err != nil {
			return 0, fmt.Errorf("read session messages: %w", err)
		}
		for cur.Next(ctx) {
			var m msgDoc
			if err := cur.Decode(&m); err != nil {
				return 0, fmt.Errorf("read session messages: %w", err)
			}
			if want[m.Client] {
				held[m.Client] = append(held[m.Client], m)
			}
		}
		if err := cur.Err(); err != nil {
			return 0, fmt.Errorf("read session messages: %w", err)
		}
		_ = cur.Close(ctx)
	}
	for _, ms := range held {
		slices.SortFunc(ms, func(a, b msgDoc) int { return cmp.Compare(a.Seq, b.Seq) })
	}
	restored := 0
	var expired []string
	for _, s := range docs {
		if take != nil && !take(&s) {
			continue
		}
		disc := s.DisconnectedAt
		if s.Connected || disc == 0 {
			disc = now // connected when the node stopped: offline from now
		}
		exp := maxExpiry
		if s.Proto == 5 && s.ExpirySet {
			exp = min(int64(s.Expiry), maxExpiry)
		}
		msgs := held[s.ID]
		if s.WillOnly {
			// Its connection is gone, with the node: the will fires, the
			// record goes.
			if s.Will != nil && s.Connected {
				d.b.mq.ScheduleWill(s.ID, s.Will.will(), now+int64(s.Will.Delay))
			}
			_, _ = d.put(durOp{kind: opSessionDel, client: s.ID})
			continue
		}
		if disc+exp < now {
			expired = append(expired, s.ID)
			for _, m := range msgs {
				d.b.limits.count(dropSessionExpired, packetQos(m.Packet), 1)
			}
			continue
		}
		sess := mqtt.Session{Expiry: s.Expiry, ExpirySet: s.ExpirySet}
		for _, sub := range s.Subs {
			sess.Subscriptions = append(sess.Subscriptions, packets.Subscription{Filter: sub.Filter, Qos: sub.Qos, NoLocal: sub.NoLocal,
				RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling, Identifier: sub.Identifier})
		}
		for _, m := range msgs {
			if m.Rel {
				// Received by the client already: only its PUBREL is
				// owed, and it never expires [MQTT-4.3.3-6].
				sess.Inflight = append(sess.Inflight, packets.Packet{
					FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1},
					PacketID:    m.PID, Origin: m.Origin, Created: m.Created})
				restored++
				continue
			}
			pk := readPacket(&rbuf{b: m.Packet})
			if m.Expiry > 0 && m.Expiry < now {
				d.b.limits.count(dropExpired, pk.FixedHeader.Qos, 1)
				_, _ = d.put(durOp{kind: opMsgDel, client: s.ID, pid: m.PID})
				continue
			}
			pk.PacketID, pk.Origin, pk.Created, pk.Expiry = m.PID, m.Origin, m.Created, m.Expiry
			pk.Properties.SubscriptionIdentifier = m.SubIDs
			sess.Inflight = append(sess.Inflight, pk)
			restored++
		}
		sess.PacketID = pidResume(s.PID)
		if c := d.b.cluster; c != nil && !adopted && s.AdoptedAt > 0 {
			// Before the session's routes can bring a message; oldest
			// first, as they were set.
			for _, e := range s.AdoptedEarlier {
				c.restoreMark(s.ID, e.From, time.UnixMilli(e.At))
			}
			c.restoreMark(s.ID, s.AdoptedFrom, time.UnixMilli(s.AdoptedAt))
		}
		d.b.mq.AdoptSession(s.ID, s.Proto, sess)
		if cl, ok := d.b.mq.Clients.Get(s.ID); ok {
			cl.SetStopTime(disc)
		}
		if s.Will != nil && (adopted || s.Connected || s.DisconnectedAt+int64(s.Will.Delay) > now) {
			d.b.mq.ScheduleWill(s.ID, s.Will.will(), disc+int64(s.Will.Delay))
		}
		d.mu.Lock()
		d.known[s.ID] = true
		delete(d.gone, s.ID)
		d.epoch[s.ID] = ownInfo{s.Epoch, s.AdoptedFrom, s.AdoptedAt, s.AdoptedEarlier}
		if adopted && sess.PacketID != 0 {
			d.pids[s.ID] = uint16(sess.PacketID) // recorded by writeOwners
		}
		d.mu.Unlock()
	}
	if len(expired) > 0 {
		for _, id := range expired {
			_, _ = d.put(durOp{kind: opSessionDel, client: id})
		}
		d.log.Info("persistent sessions expired while the node was down", "sessions", len(expired))
	}
	return restored, nil
}

// packetQos is the QoS of a PUBLISH encoded by appendPacket.
func packetQos(raw []byte) byte {
	return readPacket(&rbuf{b: raw}).FixedHeader.Qos
}

// close writes what is queued (bounded by ctx) and stops the writer; held
// acknowledgements not written by then fail (their clients are gone).
func (d *durableHook) close(ctx context.Context) error {
	err := d.w.Close(ctx)
	d.cancel()
	return err
}

// DurabilityStats report the store writes of persistent sessions and
// retained messages.
type DurabilityStats struct {
	writebehind.Stats
	// Coalesced counts messages acknowledged by their subscriber before
	// their batch was written, so never written.
	Coalesced int64 `json:"coalesced"`
	// LostOwnership counts session writes refused because another node
	// adopted the session.
	LostOwnership int64 `json:"lost_ownership"`
	// Adopted counts sessions this node took from nodes that died.
	Adopted int64 `json:"adopted"`
	// SupersededSkipped counts stored sessions of dead nodes not adopted:
	// their client had reconnected to a live node first.
	SupersededSkipped int64 `json:"superseded_skipped"`
	// Reforwarded counts publishes held for a dead node, sent on to the
	// nodes that adopted its sessions (or delivered here).
	Reforwarded int64 `json:"reforwarded"`
	// BarrierTimeouts counts node link acknowledgements held back because
	// the store had not confirmed the writes they covered within 500 ms
	// (the link then acknowledges only what was written, and asks again).
	BarrierTimeouts int64 `json:"barrier_timeouts"`
	// BarrierDropped counts node link acknowledgements held back because
	// a write they covered was dropped (lost when the writer closed): the
	// peer keeps those messages for the adopters.
	BarrierDropped int64 `json:"barrier_dropped"`
	// MovedInFailed counts sessions moved here whose stored document
	// still named their old node after two minutes of trying (store down).
	MovedInFailed int64 `json:"moved_in_failed"`
	// MovedInNoDocument counts sessions moved here whose stored document
	// was not found within 10 s (nothing taken over: the node's own
	// writes, if any, insert it).
	MovedInNoDocument int64 `json:"moved_in_no_document"`
	// MovedInStaleDeleted counts stored documents of sessions moved here,
	// written late by the old node, deleted because the client here keeps
	// no stored session (it started clean without one).
	MovedInStaleDeleted int64 `json:"moved_in_stale_deleted"`
	// RefusedOwnerUnreachable counts CONNECTs refused with 0x88 (to be
	// retried) because the node holding the client's stored session was
	// unreachable and not yet declared failed.
	RefusedOwnerUnreachable int64 `json:"refused_owner_unreachable"`
	// SubscribeRefused counts subscriptions of persistent sessions refused
	// with 0x80 because the store did not commit the session within 5 s,
	// or refused its write as another node's (a move not yet taken over).
	SubscribeRefused int64 `json:"subscribe_refused"`
	// WillUnstored counts clients with a will whose CONNACK was sent
	// before their will (its record, or their session document) was stored: the store did not
	// commit it within 5 s (the write stays queued), or another node
	// still owned the client's stored record.
	WillUnstored int64 `json:"will_unstored"`
}

func (d *durableHook) stats() *DurabilityStats {
	return &DurabilityStats{Stats: d.w.Stats(), Coalesced: d.coalesced.Load(), LostOwnership: d.lost.Load(),
		Adopted: d.adopted.Load(), SupersededSkipped: d.supersededSkipped.Load(), Reforwarded: d.reforwarded.Load(), BarrierTimeouts: d.barrierTimeouts.Load(), BarrierDropped: d.barrierDropped.Load(), MovedInFailed: d.movedInFailed.Load(), MovedInNoDocument: d.movedInNoDoc.Load(), MovedInStaleDeleted: d.movedInStale.Load(),
		RefusedOwnerUnreachable: d.refusedOwnerUnreachable.Load(), SubscribeRefused: d.subscribeRefused.Load(), WillUnstored: d.willUnstored.Load()}
}
