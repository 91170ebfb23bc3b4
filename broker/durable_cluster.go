package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

// seedRetained records who set a topic's retained message and when, for a
// message restored from the store at start, so the node's link snapshots
// carry the store's stamp and peers keep whichever change is latest.
// (The cluster code's one entry point for durability; see durable.go.)
func (c *clusterNode) seedRetained(topic string, at int64, node string) {
	c.retained.seed(topic, at, node)
}

// durableBarrier is the node link's BeforeAck: a message forwarded by a
// peer is acknowledged on the link only once what this node wrote for it
// (it went to a persistent session here) is committed, so the peer keeps
// it queued, and resends it elsewhere, should this node die first. The
// check it returns covers what was queued for the store when it was made,
// not what is queued later: under sustained load a retry waits for the
// same writes rather than for a target that moves on, and it does not
// hurry the writer (the writes still coalesce for durableMinAge). Each
// call waits at most durableBarrierMax and then reports false: the link
// acknowledges only what was safe before (which keeps it alive) and asks
// again, so a slow store delays acknowledgements but never lets the peer
// forget a message this node has not written (see link.Config.BeforeAck).
//
// A write the store did not take (lost when the writer closed with the
// store down: the sessions writer retries every other error) is not
// reported safe either: the peer keeps the message, and hands it to the
// adopters when this node is gone (writebehind.ErrDropped). Only a closing
// writer drops, so such a check never stalls a live link.
func (b *Broker) durableBarrier() func() bool {
	d := b.durable
	if d == nil {
		return func() bool { return true }
	}
	barrier := d.w.Barrier()
	return func() bool {
		ctx, cancel := context.WithTimeout(d.ctx, durableBarrierMax)
		defer cancel()
		if err := barrier.Wait(ctx); err != nil {
			if errors.Is(err, writebehind.ErrDropped) || errors.Is(err, writebehind.ErrClosed) {
				d.barrierDropped.Add(1)
			} else {
				d.barrierTimeouts.Add(1)
			}
			return false
		}
		return true
	}
}

// durableBarrierMax bounds a link acknowledgement's wait for the store: one
// half a heartbeat (link.Config.Heartbeat, 1 s).
const durableBarrierMax = 500 * time.Millisecond

// Adoption of a dead node's sessions (docs/clustering.md, "Durability").
//
// A node that gossip declares failed (not merely suspected: the split-brain
// guard) no longer serves its persistent sessions. Every survivor reads the
// sessions the store says it owned, and takes those whose client ID hashes
// to it among the live brokers (rendezvous hashing, so survivors split the
// load without talking): a conditional update on the old owner and epoch,
// so two nodes can never both take one. It installs them as offline
// sessions, with their subscriptions (routes follow, and messages queue)
// and held messages, and fires a will still pending, honouring its delay.
// The client's next CONNECT, on any node, takes the session over from the
// adopter as usual. A node that comes back finds the sessions owned by
// others: it does not load them, and its own writes to them are refused.

const (
	adoptPoll    = 250 * time.Millisecond // how often gossip is checked for failed brokers
	adoptRescan  = 5 * time.Second        // a failed broker's sessions are looked for again this often (an adopter died too)
	adoptTimeout = 30 * time.Second       // bounds one scan's store calls
)

// watchFailures adopts the sessions of brokers gossip marks failed, until
// stop closes.
func (d *durableHook) watchFailures(stop <-chan struct{}) {
	t := time.NewTicker(adoptPoll)
	defer t.Stop()
	scanned := map[string]time.Time{}
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		live, failed := d.brokers()
		for name := range scanned {
			if !failed[name] {
				delete(scanned, name)
			}
		}
		for name := range failed {
			if at, ok := scanned[name]; ok && time.Since(at) < adoptRescan {
				ctx, cancel := context.WithTimeout(d.ctx, adoptTimeout)
				if err := d.releaseWhenAdopted(ctx, name); err != nil {
					d.log.Warn("held link of a failed node not released yet", "node", name, "error", err)
				}
				cancel()
				continue
			}
			scanned[name] = time.Now()
			ctx, cancel := context.WithTimeout(d.ctx, adoptTimeout)
			n, err := d.adoptFrom(ctx, name, live)
			cancel()
			if err != nil {
				d.log.Warn("sessions of a failed node not adopted yet; retrying", "node", name, "error", err)
				delete(scanned, name)
			} else if n > 0 {
				d.log.Info("adopted the persistent sessions of a failed node", "node", name, "sessions", n)
			}
			ctx, cancel = context.WithTimeout(d.ctx, adoptTimeout)
			if err := d.releaseWhenAdopted(ctx, name); err != nil {
				d.log.Warn("held link of a failed node not released yet", "node", name, "error", err)
			}
			cancel()
		}
	}
}

// brokers returns the live brokers (this one included) and the failed ones.
func (d *durableHook) brokers() (live []string, failed map[string]bool) {
	c := d.b.cluster
	live = []string{d.node}
	failed = map[string]bool{}
	if c == nil || c.node == nil {
		return live, failed
	}
	for _, m := range c.members() {
		if m.Name == d.node || m.Tags.Role != cluster.RoleBroker {
			continue
		}
		switch m.Status {
		case cluster.StatusAlive:
			live = append(live, m.Name)
		case cluster.StatusFailed:
			failed[m.Name] = true
		}
	}
	return live, failed
}

// adoptFrom takes the sessions of dead that hash to this node among live.
func (d *durableHook) adoptFrom(ctx context.Context, dead string, live []string) (int, error) {
	cur, err := d.st.DB().Collection(store.CollSessions).Find(ctx, bson.D{{Key: "owner", Value: dead}})
	if err != nil {
		return 0, err
	}
	var docs []sessionDoc
	if err := cur.All(ctx, &docs); err != nil {
		return 0, err
	}
	var mine []sessionDoc
	for _, s := range docs {
		if rendezvousName(s.ID, live) != d.node {
			continue
		}
		// A client that reconnected to a live node while the dead one was
		// only suspected has a newer session there: adopting the stored
		// one would hold a second session for the ID (the heal exchange
		// ends whichever is older, late) and deliver its messages twice
		// and late. Its stale messages are not adopted (see
		// docs/clustering.md, "Durability").
		if p, err := d.st.Presence(ctx, s.ID); err == nil && p.Online && p.Node != dead && slices.Contains(live, p.Node) {
			d.supersededSkipped.Add(1)
			d.log.Info("stored session of a failed node not adopted: its client is connected to a live node", "client_id", s.ID, "node", p.Node)
			// The stale document goes (if still the dead node's), so the
			// live node's writes of the session are no longer refused and
			// the dead node's held link can be released.
			if _, err := d.st.DB().Collection(store.CollSessions).DeleteOne(ctx,
				bson.D{{Key: "_id", Value: s.ID}, {Key: "owner", Value: dead}, {Key: "epoch", Value: s.Epoch}}); err != nil {
				d.log.Warn("stale stored session not removed", "client_id", s.ID, "error", err)
			}
			continue
		}
		mine = append(mine, s)
	}
	return d.claim(ctx, mine, true)
}

// claim takes each session of docs from its owner (a conditional update on
// owner and epoch) and installs those it got. fireWills: their clients are
// gone, so a will still pending is published (after its delay).
func (d *durableHook) claim(ctx context.Context, docs []sessionDoc, fireWills bool) (int, error) {
	sc := d.st.DB().Collection(store.CollSessions)
	if !fireWills {
		for i := range docs {
			docs[i].Will = nil
		}
	}
	got := 0
	var claimErr error
	var marked []string
	defer func() {
		for _, id := range marked {
			d.adoptions.end(id)
		}
	}()
	take := func(s *sessionDoc) bool {
		if claimErr != nil {
			return false
		}
		// Marked before the store says this node owns it, until it is
		// installed: a CONNECT of the client here waits (claimOnConnect),
		// instead of getting a new empty session the adoption then merges
		// into unsent.
		d.adoptions.begin(s.ID)
		marked = append(marked, s.ID)
		// The claim is an insert under a unique _id first: FerretDB v1
		// runs a conditional update as a read then a write, so two
		// nodes could both "win" the update below; only one insert of
		// this _id succeeds, on every server.
		if _, err := d.st.DB().Collection(store.CollSessionClaims).InsertOne(ctx,
			bson.D{{Key: "_id", Value: fmt.Sprintf("%s|%s|%d|%d", s.ID, s.Owner, s.Epoch, s.Updated.UnixNano())}, {Key: "node", Value: d.node}, {Key: "at", Value: time.Now().UTC()}}); err != nil {
			if !mongo.IsDuplicateKeyError(err) {
				claimErr = err
			}
			return false // another node took it first
		}
		// Then the document, read and written by _id: FerretDB v1 scans
		// the collection for a filter on more than _id (one scan per
		// session made adopting thousands take minutes), and runs a
		// conditional update as this same read then write anyway.
		var cur sessionDoc
		if err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: s.ID}}).Decode(&cur); err != nil {
			if !errors.Is(err, mongo.ErrNoDocuments) {
				claimErr = err
			}
			return false
		}
		if cur.Owner != s.Owner || cur.Epoch != s.Epoch {
			return false // another node took it first
		}
		if _, err := sc.UpdateOne(ctx, bson.D{{Key: "_id", Value: s.ID}},
			bson.D{{Key: "$set", Value: bson.D{{Key: "owner", Value: d.node}, {Key: "epoch", Value: s.Epoch + 1}, {Key: "adopted_from", Value: s.Owner}}}}); err != nil {
			claimErr = err
			return false
		}
		s.Owner, s.Epoch, s.AdoptedFrom = d.node, s.Epoch+1, s.Owner
		got++
		if f := d.testAfterClaim.Load(); f != nil {
			(*f)(s.ID)
		}
		if c := d.b.cluster; c != nil {
			// Established here now: should the node it came from turn out
			// alive (a partition), the heal keeps this copy, the durable
			// one, and ends that node's stale one.
			c.owners.set(s.ID, time.Now().UnixNano())
		}
		return true
	}
	_, err := d.restore(ctx, docs, time.Now().Unix(), int64(d.b.cfg.SessionExpiry/time.Second), fireWills, take)
	d.adopted.Add(int64(got))
	return got, errors.Join(claimErr, err)
}

// claimOnConnect takes, for a client reconnecting with clean start false,
// the stored session of a node that is not alive (failed before this node
// noticed, or left), so the client finds its session even when it
// reconnects before failure detection adopted it. A session owned by a
// live peer moves by the usual link claim instead.
func (d *durableHook) claimOnConnect(cl *mqtt.Client) {
	if d.b.cluster == nil {
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
	defer cancel()
	// An adoption of this client's session under way here finishes first:
	// the CONNECT then inherits it.
	if !d.adoptions.wait(ctx, cl.ID) {
		d.log.Warn("CONNECT went on while its session was still being adopted", "client_id", cl.ID)
	}
	var s sessionDoc
	err := d.st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: cl.ID}}).Decode(&s)
	live, failed := d.brokers()
	if err != nil && !errors.Is(err, mongo.ErrNoDocuments) && len(failed) > 0 {
		// The store does not answer (a fleet reconnecting at once after a
		// node's death overloads it) while a node is down: the session may
		// be that node's. The client retries rather than start empty.
		d.refusedOwnerUnreachable.Add(1)
		d.log.Debug("client refused: its stored session could not be read while a node is down", "client_id", cl.ID, "error", err)
		cl.RefuseSession(packets.ErrServerUnavailable)
		return
	}
	if err != nil || s.Owner == d.node {
		return
	}
	if slices.Contains(live, s.Owner) {
		// Its owner may have died with it, not yet declared failed: an
		// empty session now would be the client's, and the stored one,
		// once its owner is declared failed, would be dropped as
		// superseded. The client is refused (0x88, v3.1.1 code 3) and
		// retries; once gossip declares the owner failed, the retry takes
		// the session from the store (below) or from its adopter.
		if !s.WillOnly && d.b.cluster.unreachable(s.Owner) {
			d.refusedOwnerUnreachable.Add(1)
			d.log.Debug("client refused: the node holding its session is unreachable and not yet declared failed", "client_id", cl.ID, "owner", s.Owner)
			cl.RefuseSession(packets.ErrServerUnavailable)
		}
		return
	}
	n, err := d.claim(ctx, []sessionDoc{s}, false)
	switch {
	case err != nil:
		// Not an empty session instead: the client retries.
		d.log.Warn("client refused: the stored session of a node that is gone could not be taken", "client_id", cl.ID, "owner", s.Owner, "error", err)
		d.refusedOwnerUnreachable.Add(1)
		cl.RefuseSession(packets.ErrServerUnavailable)
	case n > 0:
		d.log.Info("took the stored session of a node that is gone", "client_id", cl.ID, "owner", s.Owner)
	default:
		// A survivor's adoption claimed it first and may not have
		// installed it yet, so the link claim below would not find it:
		// the client retries, and then moves it from its adopter.
		d.refusedOwnerUnreachable.Add(1)
		cl.RefuseSession(packets.ErrServerUnavailable)
	}
}

// refuseForUnreachableOwner refuses cl's CONNECT (0x88, to be retried)
// when the store says its session belongs to one of nodes, which the claim
// found unreachable: it may have died holding it, and an empty session now
// would make the survivors drop the stored one as superseded. It reports
// whether it refused. A store that does not answer refuses nothing.
func (d *durableHook) refuseForUnreachableOwner(cl *mqtt.Client, nodes []string) bool {
	ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
	defer cancel()
	var s sessionDoc
	if err := d.st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: cl.ID}}).Decode(&s); err != nil {
		return false
	}
	if s.WillOnly || !slices.Contains(nodes, s.Owner) {
		return false
	}
	d.refusedOwnerUnreachable.Add(1)
	d.log.Debug("client refused: the node holding its session is unreachable and not yet declared failed", "client_id", cl.ID, "owner", s.Owner)
	cl.RefuseSession(packets.ErrServerUnavailable)
	return true
}

// unreachable reports whether gossip suspects the broker name or its link
// is down.
func (c *clusterNode) unreachable(name string) bool {
	if c.node.Suspected(name) {
		return true
	}
	p := c.peers.get(name)
	return p == nil || !p.link.Up()
}

// releaseWhenAdopted ends the hold of a failed peer's link once every
// session the store says it owned was adopted: its routes go, and what was
// queued for it (forwarded while it was dying, or after, since its routes
// were kept) is sent on to the nodes that adopted its sessions
// (reforward). A peer that owned no persistent session loses its routes
// and keeps the usual hold (cluster.failed_peer_hold).
func (d *durableHook) releaseWhenAdopted(ctx context.Context, dead string) error {
	c := d.b.cluster
	if c.peers.getHeld(dead) == nil {
		return nil
	}
	sc := d.st.DB().Collection(store.CollSessions)
	left, err := sc.CountDocuments(ctx, bson.D{{Key: "owner", Value: dead}})
	if err != nil || left > 0 {
		return err
	}
	cur, err := sc.Find(ctx, bson.D{{Key: "adopted_from", Value: dead}})
	if err != nil {
		return err
	}
	var docs []sessionDoc
	if err := cur.All(ctx, &docs); err != nil {
		return err
	}
	var adopters []string
	for _, s := range docs {
		if !slices.Contains(adopters, s.Owner) {
			adopters = append(adopters, s.Owner)
		}
	}
	if len(adopters) == 0 {
		// It owned no persistent session: its routes go, as without
		// durability, and its link stays held (cluster.failed_peer_hold).
		c.routes.mu.Lock()
		if c.peers.getHeld(dead) != nil {
			c.routes.dropLocked(dead)
		}
		c.routes.mu.Unlock()
		return nil
	}
	c.routes.mu.Lock()
	// Not before every adopter's routes for the sessions it took are
	// here: until then, what is published for them still goes to the held
	// link (and on to the adopters from there), not nowhere.
	for _, s := range docs {
		if s.Owner == d.node {
			continue
		}
		for _, sub := range s.Subs {
			if !c.routes.hasRemoteLocked(s.Owner, mqtt.SharedRoute(sub.Filter)) {
				c.routes.mu.Unlock()
				return nil
			}
		}
	}
	p := c.peers.releaseHeld(dead)
	if p != nil {
		c.routes.dropLocked(dead)
	}
	c.routes.mu.Unlock()
	if p == nil {
		return nil
	}
	d.mu.Lock()
	d.reforwardTo[dead] = adopters
	d.mu.Unlock()
	d.log.Info("failed node's sessions adopted: what was queued for it goes to the adopters", "node", dead,
		"adopters", adopters, "queued", p.link.Stats().QueueLen)
	p.link.Close() // hands the queue to discarded, then reforward
	return nil
}

// reforward sends the publishes a released peer's link held to the nodes
// that adopted its sessions (this one delivers its share itself). It
// reports false for a link not released that way (its queue is counted
// lost by the caller). An adopter's own subscribers that got a message
// already get it again (QoS 1/2 duplicates, bounded by what the link held).
func (c *clusterNode) reforward(peer string, msgs []link.Message) bool {
	d := c.b.durable
	if d == nil {
		return false
	}
	d.mu.Lock()
	targets, ok := d.reforwardTo[peer]
	delete(d.reforwardTo, peer)
	d.mu.Unlock()
	if !ok {
		return false
	}
	for _, m := range msgs {
		if m.Type != msgPublish {
			continue
		}
		for _, t := range targets {
			if t == c.node.Name() {
				c.deliver(peer, m)
				d.reforwarded.Add(1)
				continue
			}
			if p := c.peers.get(t); p != nil {
				if err := p.link.Queue(m, true); err == nil {
					d.reforwarded.Add(1)
					continue
				}
			}
			if pm, err := decodePublish(m.Body); err == nil {
				c.b.limits.linkDropped(t, dropNoLink, pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
			}
		}
	}
	return true
}

// movedIn takes over in the store a session that moved here from the live
// node from (a session pushed here, or a take-over whose document was not
// there yet when takeStored tried): the stored document still names from
// as its owner, so this node's writes of it would be refused and the
// session would not survive this node. The owner changes by a conditional
// update on from, retried (with backoff, up to movedInMax) while from may
// still be writing the document (it just gave the session up) or the store
// does not answer. It stops once this node owns it, when a third node does
// (an adoption: its own rules apply), when the session left this node
// again, or after movedInNoDoc without a document (nothing to take: this
// node's own writes insert it). Giving up is logged and counted
// (durability.moved_in_failed). The document is rewritten as this node
// holds the session at its next change (written here, not from this
// goroutine: the client's own goroutine owns its will).
func (d *durableHook) movedIn(id, from string) {
	go func() {
		sc := d.st.DB().Collection(store.CollSessions)
		began := time.Now()
		pause := movedInPause
		for try := 0; ; try++ {
			if try > 0 {
				select {
				case <-time.After(pause):
				case <-d.ctx.Done():
					return
				}
				pause = min(2*pause, 2*time.Second)
			}
			if _, here := d.b.mq.Clients.Get(id); !here {
				return // moved on, or ended: no longer this node's to take
			}
			ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
			var doc struct {
				Owner string `bson:"owner"`
			}
			err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&doc)
			var res *mongo.UpdateResult
			if err == nil && doc.Owner == from {
				// By _id alone, after the read (FerretDB v1 scans for _id
				// and owner together).
				res, err = sc.UpdateOne(ctx, bson.D{{Key: "_id", Value: id}},
					bson.D{{Key: "$set", Value: bson.D{{Key: "owner", Value: d.node}}},
						{Key: "$inc", Value: bson.D{{Key: "epoch", Value: 1}}}})
			}
			cancel()
			switch {
			case err == nil && (doc.Owner == d.node || (res != nil && res.MatchedCount > 0)):
				d.log.Debug("stored session taken over from the node it moved from", "client_id", id, "from", from)
				return
			case err == nil && doc.Owner != from:
				d.log.Info("stored session of a moved-in client owned by another node: not taken over", "client_id", id, "from", from, "owner", doc.Owner)
				return
			case errors.Is(err, mongo.ErrNoDocuments) && time.Since(began) > movedInNoDoc:
				return
			case time.Since(began) > movedInMax:
				d.movedInFailed.Add(1)
				d.log.Warn("stored session of a moved-in client not taken over: its old node stays the stored owner", "client_id", id, "from", from, "error", err)
				return
			}
		}
	}()
}

// movedIn's bounds: the first pause (doubling to 2 s), how long a missing
// document is waited for (the source's write lag), and how long in all
// (a store down).
const (
	movedInPause = 250 * time.Millisecond
	movedInNoDoc = 10 * time.Second
	movedInMax   = 2 * time.Minute
)

// adoptions marks the client IDs whose stored session this node is taking
// (from its claim in the store until it is installed), so that their
// CONNECT waits for it. The mutex is a leaf.
type adoptions struct {
	mu      sync.Mutex
	m       map[string]*adoptMark
	waiting atomic.Int64 // CONNECTs waiting (tests)
}

type adoptMark struct {
	n    int
	done chan struct{}
}

func (a *adoptions) begin(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[string]*adoptMark{}
	}
	m := a.m[id]
	if m == nil {
		m = &adoptMark{done: make(chan struct{})}
		a.m[id] = m
	}
	m.n++
}

func (a *adoptions) end(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if m := a.m[id]; m != nil {
		if m.n--; m.n == 0 {
			close(m.done)
			delete(a.m, id)
		}
	}
}

// wait waits until no adoption of id is under way; false if ctx ended
// first.
func (a *adoptions) wait(ctx context.Context, id string) bool {
	for {
		a.mu.Lock()
		m := a.m[id]
		a.mu.Unlock()
		if m == nil {
			return true
		}
		a.waiting.Add(1)
		select {
		case <-m.done:
			a.waiting.Add(-1)
		case <-ctx.Done():
			a.waiting.Add(-1)
			return false
		}
	}
}
