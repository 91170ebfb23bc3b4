package broker

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// claimWaiters pairs the answers to client-ID claims with the CONNECT
// waiting for them. Its mutex is a leaf.
type claimWaiters struct {
	seq atomic.Uint64
	mu  sync.Mutex
	m   map[uint64]chan claimReplyMsg
}

func newClaimWaiters() *claimWaiters { return &claimWaiters{m: map[uint64]chan claimReplyMsg{}} }

// open registers a claim expecting up to n answers and returns its ID, the
// channel they arrive on, and the function that closes it.
func (w *claimWaiters) open(n int) (uint64, <-chan claimReplyMsg, func()) {
	id := w.seq.Add(1)
	ch := make(chan claimReplyMsg, n)
	w.mu.Lock()
	w.m[id] = ch
	w.mu.Unlock()
	return id, ch, func() {
		w.mu.Lock()
		delete(w.m, id)
		w.mu.Unlock()
	}
}

// answered hands r to the claim waiting for it; false if none waits.
func (w *claimWaiters) answered(r claimReplyMsg) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	ch, ok := w.m[r.ID]
	if ok {
		select {
		case ch <- r: // buffered for every peer asked
		default:
			return false // a peer answered twice
		}
	}
	return ok
}

// connectOrder keeps a CONNECT that waited in the session hooks from
// taking over a connection of the same client that arrived later and was
// established meanwhile: the client that sent the older one gave up on it
// (its CONNACK was late) and connected again, so the older one completing
// last would end the live connection (DISCONNECT 0x8E) for a socket
// nobody reads. Each CONNECT gets a ticket when it reaches the first hook
// that may wait (durableHook.claimOnConnect, or OnSessionEstablish here),
// and is refused at the end of OnSessionEstablish if a CONNECT with a
// later ticket was established first. The mutex is a leaf.
type connectOrder struct {
	mu      sync.Mutex
	seq     uint64
	tickets map[*mqtt.Client]uint64
	at      map[*mqtt.Client]time.Time // when each ticket was given
	ids     map[string]*connectState   // client IDs with a CONNECT under way
}

type connectState struct {
	pending     int    // CONNECTs under way
	established uint64 // the ticket of the last one established
}

// waited returns how long cl's CONNECT has waited since it got its ticket
// (by the monotonic clock; 0 if it has none).
func (o *connectOrder) waited(cl *mqtt.Client) time.Duration {
	o.mu.Lock()
	at, ok := o.at[cl]
	o.mu.Unlock()
	if !ok {
		return 0
	}
	return max(time.Since(at), 1) // 0 would mean "not said"
}

// begin gives cl's CONNECT its ticket, once.
func (o *connectOrder) begin(cl *mqtt.Client) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.tickets[cl]; ok {
		return
	}
	if o.tickets == nil {
		o.tickets, o.ids, o.at = map[*mqtt.Client]uint64{}, map[string]*connectState{}, map[*mqtt.Client]time.Time{}
	}
	o.seq++
	o.tickets[cl] = o.seq
	o.at[cl] = time.Now()
	st := o.ids[cl.ID]
	if st == nil {
		st = &connectState{}
		o.ids[cl.ID] = st
	}
	st.pending++
}

// end ends cl's CONNECT, established unless refused, and reports whether
// it is stale: a later CONNECT of the client was established first.
func (o *connectOrder) end(cl *mqtt.Client, establish bool) (stale bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	t, ok := o.tickets[cl]
	if !ok {
		return false
	}
	delete(o.tickets, cl)
	delete(o.at, cl)
	st := o.ids[cl.ID]
	stale = establish && st.established > t
	if establish && !stale {
		st.established = t
	}
	if st.pending--; st.pending == 0 {
		delete(o.ids, cl.ID)
	}
	return stale
}

// claimPoll is how often a waiting claim looks whether a peer it waits for
// is suspected or lost its link: such a peer is not waited for.
const claimPoll = 20 * time.Millisecond

// OnSessionEstablish runs when a client has authenticated, before mochi
// looks for its session: every peer is told, ends a connection or session
// with the same ID (DISCONNECT 0x8E) and, unless the client starts clean,
// moves the session here (see moveOut), for mochi to inherit. The CONNECT
// waits one round trip, at most cluster.claim_timeout, but not for a peer
// gossip suspects or whose link is down; then for the moves, as long as
// they progress. A move that fails leaves the session where it was, and the
// CONNECT is refused with 0x88 (3.1.1: code 3), so the client retries
// instead of starting over with an empty session.
func (c *clusterNode) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	refuse := false
	c.connects.begin(cl)
	defer func() {
		if c.connects.end(cl, !refuse && !cl.SessionRefused()) {
			// An older CONNECT of the client, which waited here (for
			// peers, a move, an adoption) while a newer one was
			// established: it would take the newer connection over. Its
			// client gave up on it, most likely; if not, it retries.
			refuse = true
			c.claimsRefused.Add(1)
			c.log.Warn("client refused: a newer connection of the client was established here while this CONNECT waited",
				"client_id", cl.ID)
			cl.RefuseSession(packets.ErrServerUnavailable)
		}
		if !refuse {
			c.owners.set(cl.ID, time.Now())
		}
	}()
	// A session moving away for an older CONNECT elsewhere gives way to
	// this one (yieldTo), unless it left already.
	if o := c.moves.outgoing(cl.ID); o != nil {
		c.yieldTo(o, cl)
	}
	// A session being pushed here for this client by a node that leaves
	// comes first; if that move fails its source still has the session,
	// and the claim below moves it.
	if im := c.moves.incoming(cl.ID); im != nil && im.claim == 0 {
		c.waitMove(im)
	}
	if f := c.testBeforeClaims.Load(); f != nil {
		(*f)(cl.ID)
	}
	var up []*peer
	var skipped []string // peers not asked, or not waited for: unreachable
	defer func() {
		// Durable sessions: one of them may hold this client's session
		// and be dying (refuseForUnreachableOwner).
		if !refuse && !pk.Connect.Clean && len(skipped) > 0 && c.b.durable != nil && c.b.durable.refuseForUnreachableOwner(cl, skipped) {
			refuse = true
		}
	}()
	for _, p := range c.peers.aliveList() {
		if p.link.Up() && !c.node.Suspected(p.name) {
			up = append(up, p)
		} else {
			// Suspected, or its link is down (a node that just died, its
			// link dropped after the durable hook found it reachable):
			// it may hold the session.
			skipped = append(skipped, p.name)
		}
	}
	if len(up) == 0 {
		return
	}
	id, ch, done := c.claims.open(len(up))
	defer done()
	claim := claimMsg{ID: id, ClientID: cl.ID, Clean: pk.Connect.Clean}
	body := claim.encode() // to protoV1 peers
	claim.Waited = c.connects.waited(cl)
	bodyV2 := claim.encode()
	pending := map[string]*peer{}
	for _, p := range up {
		b := body
		if c.peerProtocol(p.name) >= protoV2 {
			b = bodyV2
		}
		if p.link.Send(link.Message{Type: msgClaim, Body: b}, false) {
			pending[p.name] = p
		} else {
			// Its link went down since up() (a node that just died): it
			// may hold the session (refuseForUnreachableOwner).
			skipped = append(skipped, p.name)
		}
	}
	c.claimsSent.Add(1)
	timeout := time.NewTimer(c.cfg.ClaimTimeout)
	defer timeout.Stop()
	poll := time.NewTicker(claimPoll)
	defer poll.Stop()
	var moving []*inMove
wait:
	for len(pending) > 0 {
		select {
		case r := <-ch:
			delete(pending, r.from)
			switch {
			case r.Busy:
				refuse = true
			case r.move != nil:
				moving = append(moving, r.move)
			case r.Found:
				if !pk.Connect.Clean && (len(r.Session.Subscriptions) > 0 || len(r.Session.Inflight) > 0) {
					c.adopt(cl.ID, cl.Properties.ProtocolVersion, r)
				} else if c.b.durable != nil {
					// Ended there (a clean start, or nothing worth moving):
					// its stored document, and the will in it, become this
					// node's, to rewrite or delete as this client's now.
					c.b.durable.takeOver(cl.ID, r.from)
				}
			}
		case <-poll.C:
			for name, p := range pending {
				if !p.link.Up() || !c.peers.isAlive(name) || c.node.Suspected(name) {
					delete(pending, name)
					skipped = append(skipped, name)
					c.log.Info("client ID claim: not waiting for a node that is suspected or unreachable", "client_id", cl.ID, "node", name)
				}
			}
		case <-timeout.C:
			c.claimsTimedOut.Add(1)
			c.log.Warn("client ID claim: not every node answered in time; a connection with this ID may still be open elsewhere",
				"client_id", cl.ID, "timeout", c.cfg.ClaimTimeout)
			if c.b.durable != nil && !pk.Connect.Clean {
				// A node that did not answer may hold the session (one
				// adopting it from a failed node answers once it is
				// installed): the client retries rather than start
				// empty.
				refuse = true
			}
			break wait
		}
	}
	for _, im := range moving {
		if !c.waitMove(im) {
			refuse = true
		}
	}
	if refuse {
		c.claimsRefused.Add(1)
		c.log.Warn("client refused: its session is moving or could not be moved here; it stays where it was and the client retries",
			"client_id", cl.ID)
		cl.RefuseSession(packets.ErrServerUnavailable)
	}
}

// yieldTo has the move o of cl's session away from here (answering the
// claim of a CONNECT on another node, which began before cl's: the claim
// came before it) give way to cl, and waits until the move is settled, at
// most cluster.claim_timeout. Before the source detached the session, the
// move is given up: the session stays here, whole, for cl to take over,
// and the destination refuses the older CONNECT with 0x88, as the
// connection order of one client ID wants (connectOrder, newerHere). The
// abort goes on the link ahead of cl's claims, so the destination no
// longer finds the session moving when it answers them. Once detached
// (the last chunk acknowledged: the tail and the end are in flight), the
// move goes on, and cl's claim finds the session moving or, settled, on
// a connection established after cl's CONNECT began: cl is refused
// (0x88) and its retry claims the session back. A push (the session of
// a node leaving, o.claimed false) does not give way and is not waited
// for: cl goes on to its claims, which find the session moving.
func (c *clusterNode) yieldTo(o *outMove, cl *mqtt.Client) {
	if !o.claimed {
		return
	}
	if o.askYield() {
		c.moveYields.Add(1)
		c.log.Info("a newer connection of the client asks its session's move away to give way", "client_id", cl.ID, "node", o.to)
	}
	t := time.NewTimer(c.cfg.ClaimTimeout)
	defer t.Stop()
	select {
	case <-o.ended:
	case <-t.C:
	}
}

func (c *clusterNode) adopt(id string, version byte, r claimReplyMsg) {
	if len(r.Session.Subscriptions) == 0 && len(r.Session.Inflight) == 0 {
		return
	}
	c.b.mq.AdoptSession(id, version, r.Session)
	c.moved.Add(1)
	c.warmGroups(id, r.Session.Subscriptions)
	if c.b.durable != nil {
		c.b.durable.takeOver(id, r.from)
	}
	c.log.Debug("session moved here", "client_id", id, "subscriptions", len(r.Session.Subscriptions), "queued", len(r.Session.Inflight))
}

// answerClaim ends this node's connection and session of a client that
// connected to node from. A session worth keeping moves there in pieces
// (moveOut, on its own goroutine: this one receives the acknowledgements);
// one that is moving already makes the answer Busy.
func (c *clusterNode) answerClaim(from string, m claimMsg) {
	if m.Waited > 0 {
		// The claimant's CONNECT began at least this long before now (the
		// link's latency makes it look later, never earlier): on this
		// node's monotonic clock, as no wall clock of two nodes agrees.
		m.began = time.Now().Add(-m.Waited)
	}
	// A session this node is adopting from a failed node (the store may
	// name this node its owner already, or the round has not listed it
	// yet) is answered once installed: "not found" now would give the
	// client an empty session on from. Only those: the claims of other
	// clients (whose CONNECT is refused if not answered within
	// ClaimTimeout) do not wait for a round.
	if d := c.b.durable; d != nil && !m.Clean && (d.fail.busy() != nil || d.adoptions.busy(m.ClientID)) {
		go func() {
			ctx, cancel := context.WithTimeout(d.ctx, c.cfg.ClaimTimeout)
			defer cancel()
			for ctx.Err() == nil {
				if d.adoptions.busy(m.ClientID) {
					d.adoptions.wait(ctx, m.ClientID)
					continue
				}
				idle := d.fail.busy()
				if idle == nil || !d.storedOwnerAdopted(ctx, m.ClientID) {
					break
				}
				select {
				case <-idle:
				case <-ctx.Done():
				}
			}
			c.answerClaimNow(from, m)
		}()
		return
	}
	c.answerClaimNow(from, m)
}

func (c *clusterNode) answerClaimNow(from string, m claimMsg) {
	reply := claimReplyMsg{ID: m.ID, ClientID: m.ClientID}
	cl, found := c.b.mq.Clients.Get(m.ClientID)
	switch {
	case c.moves.busy(m.ClientID):
		reply.Found, reply.Busy = true, true
	case found && c.newerHere(cl, m.began):
		// The client's connection here was established after that
		// CONNECT began (which waited, on the claimant, past its
		// client's patience: the client connected again, here): the
		// older CONNECT does not take the live one over (as
		// connectOrder on one node). Its client, if still there, retries.
		reply.Found, reply.Busy = true, true
		c.log.Info("claim of an older CONNECT refused: a newer connection of the client is live here", "client_id", m.ClientID, "node", from)
	case found && !m.Clean && hasState(cl):
		p := c.peers.get(from)
		if p == nil {
			c.log.Warn("claim not answered: no link to the node; the session stays here", "client_id", m.ClientID, "node", from)
			return
		}
		if o, ok := c.moves.startOut(m.ClientID, from, true); ok {
			o.connectBegan = m.began
			go c.moveOut(o, p, m.ID)
			return
		}
		reply.Found, reply.Busy = true, true
	default:
		_, res := c.b.mq.DetachSession(m.ClientID)
		reply.Found = res != mqtt.DetachNotFound
		if res == mqtt.DetachTakenOver {
			// A CONNECT here took the session over meanwhile (fork
			// patch 119): that connection stays; the claimant's
			// client retries, as for a newer connection here.
			reply.Busy = true
			c.log.Info("claim of an older CONNECT refused: a newer connection of the client took the session over here", "client_id", m.ClientID, "node", from)
		}
		if res == mqtt.Detached {
			c.owners.forget(m.ClientID)
			if c.b.durable != nil {
				c.b.durable.gaveUp(m.ClientID) // the claimant takes its stored document over
			}
			c.log.Debug("client connected to another node: session ended here", "client_id", m.ClientID, "node", from)
		}
	}
	c.replyClaim(c.peers.get(from), reply)
}

// newerHere reports whether cl is a live connection here established
// after a claimant's CONNECT began to wait (began, on this node's
// monotonic clock: see answerClaim; zero: not said). Both are measured
// here, so the nodes' wall clocks do not matter. The error is the link's
// latency, which makes the claimant's CONNECT look newer than it is: a
// connection established here within that latency after it does not
// refuse it (the older CONNECT takes it over, as without this check); a
// connection established before it never refuses it.
func (c *clusterNode) newerHere(cl *mqtt.Client, began time.Time) bool {
	if began.IsZero() || cl.Closed() || cl.Net.Conn == nil {
		return false
	}
	at := c.owners.at(cl.ID)
	return !at.IsZero() && at.After(began)
}

// replyClaim sends the answer to a claim to p (nil: no link to it).
func (c *clusterNode) replyClaim(p *peer, reply claimReplyMsg) {
	body, err := reply.encode()
	if err != nil {
		c.log.Error("claim answer not sent: cannot encode it", "client_id", reply.ClientID, "error", err)
		return
	}
	if p == nil || !p.link.Send(link.Message{Type: msgClaimReply, Body: body}, true) {
		name := ""
		if p != nil {
			name = p.name
		}
		c.log.Warn("claim answer not sent: no link to the node", "client_id", reply.ClientID, "node", name)
	}
}

func (c *clusterNode) claimAnswered(r claimReplyMsg) {
	if c.claims.answered(r) {
		return
	}
	// The CONNECT stopped waiting: keep a session that moved anyway (from
	// a node of the previous version, which sends it whole).
	if r.Found && (len(r.Session.Subscriptions) > 0 || len(r.Session.Inflight) > 0) {
		c.log.Warn("session handed over after its CONNECT stopped waiting: adopted late", "client_id", r.ClientID)
		c.adopt(r.ClientID, 5, r)
	}
}

// warmGroups reads, in the background, the group memberships of a client
// whose session just moved here with subscriptions that may cover group
// topics, so its first delivery does not wait for the store.
func (c *clusterNode) warmGroups(id string, subs []packets.Subscription) {
	if c.b.groups == nil {
		return
	}
	for _, sub := range subs {
		if mayCoverGroups(sub.Filter) {
			// Off this goroutine (it may be a node link's): a delivery
			// that comes first waits for this read, not for another.
			go c.b.groups.Warm(id)
			return
		}
	}
}
