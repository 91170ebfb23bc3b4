package broker

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// Session moves (see doc.go, "Session moves"). A session moves in pieces
// with flow control, and the source keeps it until the destination
// confirmed it: move start (subscriptions), chunks of queued messages, each
// acknowledged, at most moveWindow unacknowledged; then the source detaches
// the session, sends what was queued meanwhile, and the end; the
// destination installs the session and confirms. A move given up before the
// end leaves the session on the source as it was; one given up after it (a
// negative confirmation, or the destination gone) puts the detached
// session back.
const (
	// moveChunkBytes bounds the messages of one chunk (a chunk holds at
	// least one message, which the link frame always fits).
	moveChunkBytes = 256 << 10
	// moveWindow is how many chunks may wait for their acknowledgement.
	moveWindow = 4
	// moveConfirmMax bounds how long a source waits for the confirmation
	// of a move whose destination stays alive and linked; then it takes
	// the session back (the destination would have given up long before).
	moveConfirmMax = time.Minute
)

// The destination's answers to a move (moveAckMsg.Seq of msgMoveDone).
const (
	moveRefused   uint64 = 0 // given up: the source keeps (or takes back) the session
	moveInstalled uint64 = 1 // the session is the destination's now
	moveStale     uint64 = 2 // the client has a newer session there: the source drops its own
)

// moves tracks the session moves in progress, both ways. Its mutex is a
// leaf; an inMove's own mutex is taken without it.
type moves struct {
	seq   atomic.Uint64
	mu    sync.Mutex
	out   map[uint64]*outMove
	outBy map[string]*outMove // by client ID
	in    map[inKey]*inMove
	inBy  map[string]*inMove // by client ID
	// staleIn: moves this node answered moveStale (the client has a newer
	// session here), by source and client ID, until when what the source
	// relays for them is dropped (see lateArrived).
	staleIn map[staleKey]time.Time
}

type staleKey struct{ from, clientID string }

// staleRelayFor is how long a source's relay for a move answered stale is
// dropped: the source ends it at the answer, which follows it on the link
// within moveConfirmMax.
const staleRelayFor = 2 * moveConfirmMax

func newMoves() *moves {
	return &moves{out: map[uint64]*outMove{}, outBy: map[string]*outMove{}, in: map[inKey]*inMove{}, inBy: map[string]*inMove{},
		staleIn: map[staleKey]time.Time{}}
}

// markStale records that the move of clientID's session from from was
// answered stale; a later move from there clears it (unstale).
func (m *moves) markStale(from, clientID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	for k, until := range m.staleIn {
		if now.After(until) {
			delete(m.staleIn, k)
		}
	}
	m.staleIn[staleKey{from, clientID}] = now.Add(staleRelayFor)
}

func (m *moves) unstale(from, clientID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.staleIn, staleKey{from, clientID})
}

// stale reports whether what from relays for clientID belongs to a move
// this node answered stale.
func (m *moves) stale(from, clientID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	until, ok := m.staleIn[staleKey{from, clientID}]
	return ok && time.Now().Before(until)
}

// outMove is a move this node is the source of.
type outMove struct {
	id       uint64
	clientID string
	to       string
	acks     chan uint64 // chunk acknowledgements
	done     chan uint64 // the destination's answer: moveRefused, moveInstalled or moveStale
	// connectBegan is when the claimant's CONNECT began to wait, on this
	// node's monotonic clock (claimMsg.began; zero: not said, or a push).
	connectBegan time.Time
	// claimed: the move answers a claim (not a push of a node leaving).
	claimed bool
	// yield is closed when a newer CONNECT of the client here asks the
	// move to give way (yieldTo); ended, when the move is settled.
	yield, ended chan struct{}

	mu        sync.Mutex
	detached  bool // past the point of yielding: the session left Clients
	yieldAsks bool // yield is closed
}

// askYield asks the move to give way to a newer connection of its client
// here; false if it cannot any more (detached), or is a push.
func (o *outMove) askYield() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.detached || !o.claimed {
		return false
	}
	if !o.yieldAsks {
		o.yieldAsks = true
		close(o.yield)
	}
	return true
}

// detach marks the move past the point of yielding; false if it was
// asked to yield first.
func (o *outMove) detach() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.yieldAsks {
		return false
	}
	o.detached = true
	return true
}

// yielded reports whether the move was asked to yield.
func (o *outMove) yielded() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.yieldAsks
}

type inKey struct {
	from string
	id   uint64
}

type moveState int

const (
	moveReceiving moveState = iota
	moveCommitted
	moveAborted
)

// inMove is a move this node is the destination of.
type inMove struct {
	key       inKey
	clientID  string
	version   byte
	claim     uint64
	adopted   string        // the failed node the session was adopted from (cluster_failover.go)
	adoptedAt int64         // when (Unix milliseconds; 0: not sent)
	earlier   []earlierMark // its older marks, oldest first (moveStartMsg.Earlier)
	progress  chan struct{} // a message of the move arrived (capacity 1)
	done      chan struct{} // closed once committed or aborted

	mu    sync.Mutex
	state moveState
	sess  mqtt.Session
	next  uint64 // the chunk expected next
}

// marks returns the move's marks "adopted from", oldest first.
func (im *inMove) marks() []string {
	if im.adopted == "" {
		return nil
	}
	var m []string
	for _, e := range im.earlier {
		m = append(m, e.From)
	}
	return append(m, im.adopted)
}

// markList is marks with their times and done flags.
func (im *inMove) markList() []earlierMark {
	if im.adopted == "" {
		return nil
	}
	return append(slices.Clone(im.earlier), earlierMark{From: im.adopted, At: im.adoptedAt})
}

// startOut registers a move of clientID's session to peer to; false if the
// session is moving already (either way).
func (m *moves) startOut(clientID, to string, claimed bool) (*outMove, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.outBy[clientID] != nil || m.inBy[clientID] != nil {
		return nil, false
	}
	o := &outMove{id: m.seq.Add(1), clientID: clientID, to: to,
		acks: make(chan uint64, 2*moveWindow+2), done: make(chan uint64, 1),
		claimed: claimed, yield: make(chan struct{}), ended: make(chan struct{})}
	m.out[o.id], m.outBy[clientID] = o, o
	return o, true
}

func (m *moves) endOut(o *outMove) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.out, o.id)
	if m.outBy[o.clientID] == o {
		delete(m.outBy, o.clientID)
	}
	close(o.ended)
}

// outgoing returns the move of clientID's session away from here, if one
// is in progress.
func (m *moves) outgoing(clientID string) *outMove {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.outBy[clientID]
}

func (m *moves) getOut(from string, id uint64) *outMove {
	m.mu.Lock()
	defer m.mu.Unlock()
	if o := m.out[id]; o != nil && o.to == from {
		return o
	}
	return nil
}

// busy reports whether clientID's session is moving, either way.
func (m *moves) busy(clientID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.outBy[clientID] != nil || m.inBy[clientID] != nil
}

func (m *moves) startIn(im *inMove) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.in[im.key], m.inBy[im.clientID] = im, im
}

func (m *moves) getIn(k inKey) *inMove {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.in[k]
}

func (m *moves) incoming(clientID string) *inMove {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.inBy[clientID]
}

func (m *moves) endIn(im *inMove) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.in, im.key)
	if m.inBy[im.clientID] == im {
		delete(m.inBy, im.clientID)
	}
}

// count is the number of moves in progress, both ways.
func (m *moves) count() (out, in int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.out), len(m.in)
}

// hasState reports whether a session holds anything worth moving.
func hasState(cl *mqtt.Client) bool {
	return cl.State.Subscriptions.Len() > 0 || cl.State.Inflight.Len() > 0
}

// sameFilters reports whether a and b subscribe to the same filters with
// the same QoS.
func sameFilters(a, b []packets.Subscription) bool {
	if len(a) != len(b) {
		return false
	}
	qos := make(map[string]byte, len(a))
	for _, s := range a {
		qos[s.Filter] = s.Qos
	}
	for _, s := range b {
		if q, ok := qos[s.Filter]; !ok || q != s.Qos {
			return false
		}
	}
	return true
}

// moveEnd is the end of move id after chunks chunks (all of them: the
// tail's included), for peer: with the session's packet ID counter if peer
// reads it (protoV2).
func (c *clusterNode) moveEnd(id, chunks uint64, peer string, pid uint32) moveEndMsg {
	end := moveEndMsg{Move: id, Chunks: chunks}
	if c.peerProtocol(peer) >= protoV2 {
		end.PacketID = pid
	}
	return end
}

// moveOut moves client id's session to peer p, answering claim (0: the
// session is pushed, this node leaving), and returns once the move is
// settled: true if the destination installed the session. On false the
// session is here, whole. o was registered by moves.startOut.
func (c *clusterNode) moveOut(o *outMove, p *peer, claim uint64) bool {
	defer c.moves.endOut(o)
	cl, ok := c.b.mq.Clients.Get(o.clientID)
	if !ok {
		return false
	}
	// A done mark stays only for a later one: nothing of its node's held
	// links is still to come.
	if dead := markedFrom(c.adopted.list(o.clientID), true); len(dead) > 0 && claim != 0 {
		// Adopted from a failed node: what the brokers held for it
		// reaches it here first, so it is not delivered again there
		// (cluster_failover.go).
		held := make(chan bool, 1)
		go func() {
			end := time.Now().Add(heldWaitMax)
			ok := true
			for _, n := range dead {
				ok = c.awaitHeld(n, max(time.Until(end), 0)) && ok
			}
			held <- ok
		}()
		select {
		case ok := <-held:
			if !ok {
				c.log.Debug("session adopted from a failed node moves before every held copy reached it", "client_id", o.clientID, "nodes", dead)
			}
		case <-o.yield: // the session stays here: so do the held copies
		}
		// A CONNECT here may have taken the session over meanwhile: its
		// new client holds it now (the one found above is emptied).
		if cl, ok = c.b.mq.Clients.Get(o.clientID); !ok {
			return false
		}
		if o.yielded() {
			// A newer CONNECT here waits for this move (yieldTo): the
			// session stays for it, the claimant retries.
			c.log.Info("session move given up for a newer connection of the client here", "client_id", o.clientID, "node", o.to)
			c.replyClaim(p, claimReplyMsg{ID: claim, ClientID: o.clientID, Found: true, Busy: true})
			return false
		}
		if c.newerHere(cl, o.connectBegan) {
			// That connection is newer than the claimant's CONNECT
			// (see answerClaimNow): it stays, the claimant retries.
			c.log.Info("claim of an older CONNECT refused: a newer connection of the client took the session here while its move waited", "client_id", o.clientID, "node", o.to)
			c.replyClaim(p, claimReplyMsg{ID: claim, ClientID: o.clientID, Found: true, Busy: true})
			return false
		}
	}
	if !cl.Closed() && cl.Net.Conn != nil {
		// [MQTT-3.1.4-3]: the connection here ends now; the session
		// stays until the destination has it.
		_ = c.b.mq.DisconnectClient(cl, packets.ErrSessionTakenOver)
	}
	start := moveStartMsg{Move: o.id, Claim: claim, ClientID: o.clientID, Version: cl.Properties.ProtocolVersion}
	if c.peerProtocol(p.name) >= protoV2 { // protoV1 refuses the field
		// The newest mark in AdoptedFrom, which the previous release
		// reads alone; the older ones in Earlier.
		if marks := c.adopted.list(o.clientID); len(marks) > 0 {
			start.AdoptedFrom = marks[len(marks)-1].from
			if c.b.durable != nil {
				start.AdoptedAt = c.b.durable.markAt(o.clientID, start.AdoptedFrom)
			}
			for _, m := range marks[:len(marks)-1] {
				// Done goes too: the destination may have joined after
				// m's failover and never hear a broker done with it.
				e := earlierMark{From: m.from, Done: m.done}
				if c.b.durable != nil {
					e.At = c.b.durable.markAt(o.clientID, m.from)
				}
				start.Earlier = append(start.Earlier, e)
			}
		}
	}
	if cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryIntervalFlag {
		start.Expiry, start.ExpirySet = cl.Properties.Props.SessionExpiryInterval, true
	}
	for _, sub := range cl.State.Subscriptions.GetAll() {
		start.Subs = append(start.Subs, sub)
	}
	slices.SortFunc(start.Subs, func(a, b packets.Subscription) int { return strings.Compare(a.Filter, b.Filter) })
	snapshot := publishesOnly(cl.State.Inflight.GetAll(false))
	if !p.link.Send(link.Message{Type: msgMoveStart, Body: start.encode()}, true) {
		c.log.Warn("session not moved: link queue full", "client_id", o.clientID, "node", o.to)
		c.movesFailed.Add(1)
		return false
	}
	st := &moveStream{c: c, o: o, p: p}
	if !st.send(snapshot) || !o.detach() {
		st.abort()
		if o.yielded() {
			// A newer CONNECT here (yieldTo): the session, not detached,
			// stays here for it; the destination refuses the claimant's
			// CONNECT (0x88), which is older.
			c.log.Info("session move given up for a newer connection of the client here", "client_id", o.clientID, "node", o.to, "chunks", st.seq)
			return false
		}
		if st.answer == moveStale {
			c.dropStale(o.clientID, o.to)
			return false
		}
		c.movesFailed.Add(1)
		return false
	}
	// Every queued message so far is at the destination: detach the
	// session (its subscriptions leave this node's routes) and send what
	// arrived meanwhile.
	sent := make(map[queuedKey]bool, len(snapshot))
	for _, pk := range snapshot {
		sent[keyOf(pk)] = true
	}
	// Its routes stay, and what arrives for it goes on to the destination,
	// until every peer holds the destination's routes (cluster_relay.go).
	r := c.startRelay(o.id, o.clientID, o.to, start.Subs)
	moved, putBack := false, true
	defer func() {
		if moved {
			go c.stopRelayWhenRouted(r, start.Subs)
		} else {
			c.stopRelay(r, start.Subs, putBack)
		}
	}()
	sess, res := c.b.mq.DetachSession(o.clientID)
	found := res == mqtt.Detached
	switch res {
	case mqtt.DetachNotFound:
		sess = mqtt.Session{Subscriptions: start.Subs, Inflight: snapshot, Expiry: start.Expiry, ExpirySet: start.ExpirySet}
	case mqtt.DetachTakenOver:
		// A CONNECT here took the session over between the move's
		// yield check and its detach (fork patch 119): the session
		// stays here with that connection, which is newer than the
		// claimant's. Not "not found": the snapshot would make a second
		// copy of the session at the destination.
		st.abort()
		c.movesFailed.Add(1)
		c.log.Info("session move given up for a newer connection of the client here", "client_id", o.clientID, "node", o.to, "chunks", st.seq)
		return false
	}
	if f := c.testMoveDetached.Load(); f != nil {
		(*f)(o.clientID)
	}
	if found && !sameFilters(start.Subs, sess.Subscriptions) {
		// A CONNECT here took the session over after start was built:
		// the destination would install subscriptions that are not the
		// session's. It stays here, and the claimant retries.
		st.abort()
		c.restore(o, start.Version, sess, "a connection here took it over during the transfer")
		return false
	}
	tail := slices.DeleteFunc(publishesOnly(sess.Inflight), func(pk packets.Packet) bool { return sent[keyOf(pk)] })
	if !st.send(tail) || !p.link.Send(link.Message{Type: msgMoveEnd, Body: c.moveEnd(o.id, st.seq, p.name, sess.PacketID).encode()}, true) {
		st.abort()
		c.restore(o, start.Version, sess, "the transfer failed")
		return false
	}
	c.endRelay(r)
	if !st.confirmed() {
		if st.answer == moveStale {
			// Detached already: dropped, with what it held.
			// Nothing relayed is put back: the session is gone, the
			// client's newer one elsewhere is entitled to what it
			// subscribes to there.
			putBack = false
			c.relays.remove(r) // no more relayed from now
			c.owners.forget(o.clientID)
			c.dropStaleSession(o.clientID, o.to, sess.Inflight)
			return false
		}
		c.restore(o, start.Version, sess, "the destination did not confirm it")
		return false
	}
	moved = true
	c.movedOut.Add(1)
	c.owners.forget(o.clientID)
	if c.b.durable != nil {
		c.b.durable.gaveUp(o.clientID) // the destination takes its stored document over
	}
	c.log.Debug("session moved to another node", "client_id", o.clientID, "node", o.to,
		"subscriptions", len(sess.Subscriptions), "queued", len(snapshot)+len(tail), "chunks", st.seq)
	return true
}

// dropStale ends a session the client replaced with a newer one on node
// while this node was cut off (see cluster_heal.go).
func (c *clusterNode) dropStale(id, node string) {
	sess, res := c.b.mq.DetachSession(id)
	if res != mqtt.Detached {
		return // none here, or a newer connection here took it over
	}
	c.owners.forget(id)
	c.dropStaleSession(id, node, sess.Inflight)
}

// restore puts back a session detached for a move that failed.
func (c *clusterNode) restore(o *outMove, version byte, sess mqtt.Session, why string) {
	c.movesFailed.Add(1)
	if len(sess.Subscriptions) > 0 || len(sess.Inflight) > 0 {
		c.b.mq.AdoptSession(o.clientID, version, sess)
	}
	c.log.Warn("session move failed: the session stays here", "client_id", o.clientID, "node", o.to, "reason", why,
		"queued", len(sess.Inflight))
}

// moveStream sends the chunks of one move, at most moveWindow of them
// unacknowledged.
type moveStream struct {
	c      *clusterNode
	o      *outMove
	p      *peer
	seq    uint64 // chunks sent
	acked  uint64 // chunks acknowledged
	answer uint64 // the destination's answer, once it came
}

// send sends pks in chunks and waits until all are acknowledged; false if
// the destination gave up, went, or stalled for cluster.claim_timeout.
func (s *moveStream) send(pks []packets.Packet) bool {
	for len(pks) > 0 || s.acked < s.seq {
		if len(pks) > 0 && s.seq-s.acked < moveWindow {
			n, size := 0, 0
			for n < len(pks) && (n == 0 || size+len(pks[n].Payload)+len(pks[n].TopicName) <= moveChunkBytes) {
				size += len(pks[n].Payload) + len(pks[n].TopicName)
				n++
			}
			if f := s.c.testMoveChunk.Load(); f != nil {
				(*f)("source", s.seq)
			}
			body, err := moveChunkMsg{Move: s.o.id, Seq: s.seq, Queued: pks[:n]}.encode()
			if err != nil {
				s.c.log.Error("session not moved: cannot encode a message", "client_id", s.o.clientID, "error", err)
				return false
			}
			if s.o.yielded() {
				return false
			}
			if err := s.p.link.Queue(link.Message{Type: msgMoveChunk, Body: body}, true); err != nil {
				s.c.log.Warn("session not moved: chunk not queued", "client_id", s.o.clientID, "node", s.o.to, "error", err)
				return false
			}
			pks = pks[n:]
			s.seq++
			continue
		}
		if !s.wait() {
			return false
		}
	}
	return true
}

// wait waits for the next acknowledgement.
func (s *moveStream) wait() bool {
	t := time.NewTimer(s.c.cfg.ClaimTimeout)
	defer t.Stop()
	select {
	case seq := <-s.o.acks:
		if seq >= s.acked {
			s.acked = seq + 1
		}
		return true
	case answer := <-s.o.done: // a refusal: a confirmation comes only after the end
		s.answer = answer
		s.c.log.Warn("session move: the destination gave it up", "client_id", s.o.clientID, "node", s.o.to)
		return false
	case <-s.yield():
		return false
	case <-t.C:
		s.c.log.Warn("session move: the destination stopped acknowledging", "client_id", s.o.clientID, "node", s.o.to,
			"timeout", s.c.cfg.ClaimTimeout)
		return false
	}
}

// yield is the move's yield channel until it detached the session: a
// newer CONNECT then no longer stops it.
func (s *moveStream) yield() <-chan struct{} {
	s.o.mu.Lock()
	defer s.o.mu.Unlock()
	if s.o.detached {
		return nil
	}
	return s.o.yield
}

// abort tells the destination the move is given up (best effort: it gives
// up on its own when nothing comes).
func (s *moveStream) abort() {
	s.p.link.Send(link.Message{Type: msgMoveEnd, Body: moveEndMsg{Move: s.o.id, Chunks: s.seq, Abort: true}.encode()}, true)
}

// confirmed waits for the destination's confirmation. A destination that
// stays alive and linked answers (its deadline is shorter), so waiting
// ends early only when it is gone: gossip no longer shows it alive, or it
// came back as another process.
func (s *moveStream) confirmed() bool {
	inc := s.p.link.Stats().PeerIncarnation
	deadline := time.NewTimer(moveConfirmMax)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case answer := <-s.o.done:
			s.answer = answer
			return answer == moveInstalled
		case <-s.o.acks:
		case <-deadline.C:
			return false
		case <-tick.C:
			if !s.c.peers.isAlive(s.o.to) {
				return false
			}
			if now := s.p.link.Stats().PeerIncarnation; now != inc && now != 0 && inc != 0 {
				return false
			}
		}
	}
}

// queuedKey identifies a queued message of a session across its snapshot
// and the detached session (a packet ID may be reused once freed).
type queuedKey struct {
	id      uint16
	created int64
	topic   string
	size    int
}

func keyOf(pk packets.Packet) queuedKey {
	return queuedKey{pk.PacketID, pk.Created, pk.TopicName, len(pk.Payload)}
}

// publishesOnly keeps the PUBLISH entries of a session's queue: a QoS 2
// exchange half done (PUBREC/PUBREL state) does not move (see
// third_party/mochi/PATCHES.md, patch 17).
func publishesOnly(pks []packets.Packet) []packets.Packet {
	return slices.DeleteFunc(pks, func(pk packets.Packet) bool { return pk.FixedHeader.Type != packets.Publish })
}

// Destination side: the handlers run on the link's receive goroutine.

func (c *clusterNode) moveStarted(from string, m moveStartMsg) {
	c.moves.unstale(from, m.ClientID)
	im := &inMove{key: inKey{from, m.Move}, clientID: m.ClientID, version: m.Version, claim: m.Claim, adopted: m.AdoptedFrom, adoptedAt: m.AdoptedAt, earlier: m.Earlier,
		progress: make(chan struct{}, 1), done: make(chan struct{}),
		sess: mqtt.Session{Subscriptions: m.Subs, Expiry: m.Expiry, ExpirySet: m.ExpirySet}}
	c.moves.startIn(im)
	if m.Claim != 0 {
		if !c.claims.answered(claimReplyMsg{ID: m.Claim, ClientID: m.ClientID, Found: true, from: from, move: im}) {
			if _, here := c.b.mq.Clients.Get(m.ClientID); here && c.owners.get(m.ClientID) != 0 {
				// The CONNECT stopped waiting and went on: the client has
				// a newer session here (the source was cut off when it
				// claimed), and the source's is stale.
				c.moves.endIn(im)
				// The source may relay what reaches it for the session
				// until it reads this answer: not for the newer session
				// here, which got what was published since directly.
				c.moves.markStale(from, m.ClientID)
				c.sendMoveMsg(from, msgMoveDone, moveAckMsg{Move: m.Move, Seq: moveStale})
				return
			}
			// The CONNECT was refused: the source keeps the session.
			c.abortIn(im)
		}
		return
	}
	// Pushed by a node that leaves: nobody waits, so watch it here.
	go c.waitMove(im)
}

func (c *clusterNode) moveChunk(from string, m moveChunkMsg) {
	if f := c.testMoveChunk.Load(); f != nil {
		(*f)("destination", m.Seq)
	}
	im := c.moves.getIn(inKey{from, m.Move})
	if im == nil {
		c.sendMoveDone(from, m.Move, false)
		return
	}
	im.mu.Lock()
	ok := im.state == moveReceiving && m.Seq == im.next
	if ok {
		im.sess.Inflight = append(im.sess.Inflight, m.Queued...)
		im.next++
	}
	im.mu.Unlock()
	if !ok {
		c.abortIn(im)
		return
	}
	c.sendMoveMsg(from, msgMoveAck, moveAckMsg{Move: m.Move, Seq: m.Seq})
	select {
	case im.progress <- struct{}{}:
	default:
	}
}

func (c *clusterNode) moveEnded(from string, m moveEndMsg) {
	im := c.moves.getIn(inKey{from, m.Move})
	if im == nil {
		if !m.Abort {
			c.sendMoveDone(from, m.Move, false)
		}
		return
	}
	defer c.moves.endIn(im)
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.state != moveReceiving {
		if !m.Abort {
			c.sendMoveDone(from, m.Move, false)
		}
		return
	}
	if m.Abort || m.Chunks != im.next {
		im.state = moveAborted
		close(im.done)
		if !m.Abort {
			c.sendMoveDone(from, m.Move, false)
		}
		return
	}
	// The CONNECT waiting for it (if any) inherits the session from here,
	// with the source's packet ID counter.
	im.sess.PacketID = m.PacketID
	// Before the session's subscriptions go live here: what a failed
	// node's held links kept for it comes through their copy alone.
	c.moveInMarks(im.clientID, im.markList())
	for _, dead := range im.marks() {
		c.adoptedGroups.add(dead, im.clientID, filtersOf(im.sess.Subscriptions))
	}
	if len(im.sess.Subscriptions) > 0 || len(im.sess.Inflight) > 0 {
		c.b.mq.AdoptSession(im.clientID, im.version, im.sess)
		c.moved.Add(1)
		c.warmGroups(im.clientID, im.sess.Subscriptions)
		if c.b.durable != nil {
			// The mark goes into the stored document with the take-over
			// and every write after it (a restart here restores it).
			c.b.durable.movedMark(im.clientID, im.adopted, im.adoptedAt, im.earlier)
			// In the writer's order, ahead of the session's write by the
			// CONNECT waiting for it, if any.
			c.b.durable.takeOver(im.clientID, from)
		}
	}
	im.state = moveCommitted
	c.owners.set(im.clientID, time.Now())
	close(im.done)
	c.sendMoveDone(from, m.Move, true)
	// Once every peer holds this node's routes for the session, the source
	// drops its own (cluster_relay.go).
	c.confirmWhenRouted(from, m.Move)
	c.log.Debug("session moved here", "client_id", im.clientID, "node", from,
		"subscriptions", len(im.sess.Subscriptions), "queued", len(im.sess.Inflight), "pushed", im.claim == 0)
}

// abortIn gives up an incoming move (unless settled already) and tells
// the source, which keeps or takes back the session.
func (c *clusterNode) abortIn(im *inMove) bool {
	im.mu.Lock()
	aborted := im.state == moveReceiving
	if aborted {
		im.state = moveAborted
		close(im.done)
	}
	im.mu.Unlock()
	if aborted {
		c.moves.endIn(im)
		c.sendMoveDone(im.key.from, im.key.id, false)
	}
	return aborted
}

// waitMove waits until an incoming move is settled, giving it up when
// nothing of it arrived for cluster.claim_timeout; true if the session was
// installed here.
func (c *clusterNode) waitMove(im *inMove) bool {
	t := time.NewTimer(c.cfg.ClaimTimeout)
	defer t.Stop()
	for {
		select {
		case <-im.done:
			im.mu.Lock()
			defer im.mu.Unlock()
			return im.state == moveCommitted
		case <-im.progress:
			t.Reset(c.cfg.ClaimTimeout)
		case <-t.C:
			if c.abortIn(im) {
				c.log.Warn("session move given up: the source stopped sending", "client_id", im.clientID, "node", im.key.from,
					"timeout", c.cfg.ClaimTimeout)
				return false
			}
		}
	}
}

func (c *clusterNode) moveAcked(from string, m moveAckMsg) {
	if o := c.moves.getOut(from, m.Move); o != nil {
		select {
		case o.acks <- m.Seq:
		default: // never full: at most moveWindow unacknowledged
		}
	}
}

func (c *clusterNode) moveDone(from string, m moveAckMsg) {
	if m.Seq == moveInstalled {
		// Before the publishes that follow on this link: from delivers
		// those it published from now on to the session itself.
		c.relays.installed(from, m.Move)
	}
	if o := c.moves.getOut(from, m.Move); o != nil {
		select {
		case o.done <- m.Seq:
		default:
		}
	}
}

func (c *clusterNode) sendMoveDone(to string, move uint64, ok bool) {
	answer := moveRefused
	if ok {
		answer = moveInstalled
	}
	c.sendMoveMsg(to, msgMoveDone, moveAckMsg{Move: move, Seq: answer})
}

func (c *clusterNode) sendMoveMsg(to string, typ byte, m moveAckMsg) {
	p := c.peers.get(to)
	if p == nil {
		p = c.peers.getHeld(to)
	}
	if p == nil || !p.link.Send(link.Message{Type: typ, Body: m.encode()}, true) {
		c.log.Warn("session move message not sent: no link to the node", "node", to, "move", m.Move)
	}
}

// handOver pushes every session this node holds to a live peer (the one
// rendezvous hashing of the client ID picks among brokers not draining),
// a few at a time, bounded by ctx: a node that stops gracefully leaves
// nothing behind. With offlineOnly, sessions whose client is connected stay
// (an evacuation ends them with their connection). Sessions it could not
// move are returned.
func (c *clusterNode) handOver(ctx context.Context, offlineOnly bool) (kept []*mqtt.Client) {
	var live []*peer
	draining := map[string]bool{}
	for _, m := range c.members() {
		draining[m.Name] = m.Tags.Draining
	}
	for _, p := range c.peers.up() {
		if !draining[p.name] && !c.node.Suspected(p.name) {
			live = append(live, p)
		}
	}
	var todo []*mqtt.Client
	for _, cl := range c.b.mq.Clients.GetAll() {
		if !cl.Net.Inline && hasState(cl) && (!offlineOnly || cl.Closed()) {
			todo = append(todo, cl)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	if len(live) == 0 {
		c.log.Warn("stopping with sessions and no live peer to hand them to", "sessions", len(todo))
		return todo
	}
	c.log.Info("handing sessions over before leaving", "sessions", len(todo), "peers", len(live))
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		sem = make(chan struct{}, 8)
	)
	for _, cl := range todo {
		if ctx.Err() != nil {
			mu.Lock()
			kept = append(kept, cl)
			mu.Unlock()
			continue
		}
		p := rendezvous(cl.ID, live)
		o, ok := c.moves.startOut(cl.ID, p.name, false)
		if !ok {
			continue // moving already, on a claim
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if !c.moveOut(o, p, 0) {
				mu.Lock()
				kept = append(kept, cl)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	// Moves started by claims meanwhile finish too.
	for ctx.Err() == nil {
		if out, _ := c.moves.count(); out == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.log.Info("sessions handed over", "moved", len(todo)-len(kept), "kept", len(kept))
	return kept
}

// rendezvous picks the peer with the highest hash of (client ID, peer
// name): every node picks the same one, and a peer that goes moves only
// its own share of clients.
func rendezvous(clientID string, peers []*peer) *peer {
	var best *peer
	var bestH uint64
	for _, p := range peers {
		h := fnv64(clientID, p.name)
		if best == nil || h > bestH || (h == bestH && p.name < best.name) {
			best, bestH = p, h
		}
	}
	return best
}

// rendezvousName is rendezvous over node names (a node's own name
// included), with the same hash and tie-break, for choices made from the
// member list rather than from linked peers (durable_cluster.go).
func rendezvousName(clientID string, names []string) string {
	var best string
	var bestH uint64
	for _, n := range names {
		h := fnv64(clientID, n)
		if best == "" || h > bestH || (h == bestH && n < best) {
			best, bestH = n, h
		}
	}
	return best
}

func fnv64(a, b string) uint64 {
	h := uint64(14695981039346656037)
	for _, s := range []string{a, "\x00", b} {
		for i := 0; i < len(s); i++ {
			h ^= uint64(s[i])
			h *= 1099511628211
		}
	}
	return h
}
