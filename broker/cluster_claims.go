package broker

import (
	"slices"
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
	ch, ok := w.m[r.ID]
	w.mu.Unlock()
	if ok {
		ch <- r // buffered for every peer asked
	}
	return ok
}

// OnSessionEstablish runs when a client has authenticated, before mochi
// looks for its session: every peer is told, ends a connection or session
// with the same ID (DISCONNECT 0x8E) and, unless the client starts clean,
// hands the session over, which is installed here for mochi to inherit.
// The CONNECT waits one round trip, at most cluster.claim_timeout.
func (c *clusterNode) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	up := c.peers.up()
	if len(up) == 0 {
		return
	}
	id, ch, done := c.claims.open(len(up))
	defer done()
	body := claimMsg{ID: id, ClientID: cl.ID, Clean: pk.Connect.Clean}.encode()
	sent := 0
	for _, p := range up {
		if p.link.Send(link.Message{Type: msgClaim, Body: body}, false) {
			sent++
		}
	}
	c.claimsSent.Add(1)
	timeout := time.NewTimer(c.cfg.ClaimTimeout)
	defer timeout.Stop()
	for range sent {
		select {
		case r := <-ch:
			if r.Found && !pk.Connect.Clean {
				c.adopt(cl.ID, cl.Properties.ProtocolVersion, r)
			}
		case <-timeout.C:
			c.claimsTimedOut.Add(1)
			c.log.Warn("client ID claim: not every node answered in time; a connection with this ID may still be open elsewhere",
				"client_id", cl.ID, "timeout", c.cfg.ClaimTimeout)
			return
		}
	}
}

func (c *clusterNode) adopt(id string, version byte, r claimReplyMsg) {
	if len(r.Session.Subscriptions) == 0 && len(r.Session.Inflight) == 0 {
		return
	}
	c.b.mq.AdoptSession(id, version, r.Session)
	c.moved.Add(1)
	c.log.Debug("session moved here", "client_id", id, "subscriptions", len(r.Session.Subscriptions), "queued", len(r.Session.Inflight))
}

func (c *clusterNode) answerClaim(from string, m claimMsg) {
	sess, found := c.b.mq.DetachSession(m.ClientID)
	reply := claimReplyMsg{ID: m.ID, ClientID: m.ClientID, Found: found}
	if found && !m.Clean {
		reply.Session = sess
		// PUBLISHes move; a QoS 2 exchange half done (PUBREC/PUBREL state)
		// does not (see third_party/mochi/PATCHES.md, patch 17).
		reply.Session.Inflight = slices.DeleteFunc(sess.Inflight, func(pk packets.Packet) bool { return pk.FixedHeader.Type != packets.Publish })
	}
	if found {
		c.log.Debug("client connected to another node: session ended here", "client_id", m.ClientID, "node", from, "moved", !m.Clean)
	}
	body, err := reply.encode()
	if err != nil {
		c.log.Error("claim answer not sent: cannot encode the session", "client_id", m.ClientID, "error", err)
		return
	}
	p := c.peers.get(from)
	if p == nil || !p.link.Send(link.Message{Type: msgClaimReply, Body: body}, true) {
		c.log.Warn("claim answer not sent: no link to the node", "client_id", m.ClientID, "node", from)
	}
}

func (c *clusterNode) claimAnswered(r claimReplyMsg) {
	if c.claims.answered(r) {
		return
	}
	// The CONNECT stopped waiting: keep a session that moved anyway.
	if r.Found && (len(r.Session.Subscriptions) > 0 || len(r.Session.Inflight) > 0) {
		c.log.Warn("session handed over after its CONNECT stopped waiting: adopted late", "client_id", r.ClientID)
		c.adopt(r.ClientID, 5, r)
	}
}
