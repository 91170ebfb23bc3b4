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
	"go.mongodb.org/mongo-driver/v2/mongo/options"

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

// failover is what this node knows of its adoptions of failed brokers'
// sessions: CONNECTs of their clients wait for the adoption under way
// instead of each reading and claiming its session alone. The mutex is a
// leaf.
type failover struct {
	kick chan struct{} // a CONNECT waits for an adoption: run the watcher now

	mu sync.Mutex
	// adopted has, for each broker gossip declared failed, a channel
	// closed once this node's first adoption round of it completed (its
	// share of the failed node's sessions is installed here).
	adopted map[string]chan struct{}
	doneAt  map[string]time.Time // when the round of adopted ended
	running int                  // adoption rounds under way
	idle    chan struct{}        // closed when running drops to 0
	from    map[string]int       // the failed brokers of the rounds under way
}

// begin and end bracket an adoption round of dead's sessions.
func (f *failover) begin(dead string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running == 0 {
		f.idle = make(chan struct{})
	}
	f.running++
	if f.from == nil {
		f.from = map[string]int{}
	}
	f.from[dead]++
}

func (f *failover) end(dead string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.from[dead]--; f.from[dead] <= 0 {
		delete(f.from, dead)
	}
	if f.running--; f.running == 0 {
		close(f.idle)
	}
}

// adopting reports whether a round under way adopts owner's sessions.
func (f *failover) adopting(owner string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.from[owner] > 0
}

// busy returns a channel closed once no adoption round runs, or nil if
// none does.
func (f *failover) busy() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running == 0 {
		return nil
	}
	return f.idle
}

// round returns the channel closed when this node's adoption of dead's
// sessions completed (made on first use).
func (f *failover) round(dead string) chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.adopted == nil {
		f.adopted = map[string]chan struct{}{}
	}
	ch := f.adopted[dead]
	if ch == nil {
		ch = make(chan struct{})
		f.adopted[dead] = ch
	}
	return ch
}

// roundDone marks dead's adoption completed.
func (f *failover) roundDone(dead string) {
	ch := f.round(dead)
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-ch:
	default:
		close(ch)
		if f.doneAt == nil {
			f.doneAt = map[string]time.Time{}
		}
		f.doneAt[dead] = time.Now()
	}
}

// since returns how long ago this node's first adoption round of dead
// ended (0 if it has not).
func (f *failover) since(dead string) time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	at, ok := f.doneAt[dead]
	if !ok {
		return 0
	}
	return time.Since(at)
}

// forget drops dead's state: it is alive again, or gone from gossip.
func (f *failover) forget(dead string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.adopted, dead)
	delete(f.doneAt, dead)
}

// watchFailures adopts the sessions of brokers gossip marks failed, until
// stop closes.
func (d *durableHook) watchFailures(stop <-chan struct{}) {
	t := time.NewTicker(adoptPoll)
	defer t.Stop()
	scanned := map[string]time.Time{}
	episode := map[string]bool{} // failed brokers, since this node saw them fail
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		case <-d.fail.kick:
		}
		live, failed := d.brokers()
		for name := range episode {
			if !failed[name] {
				delete(episode, name)
				delete(scanned, name)
				d.fail.forget(name)
				if c := d.b.cluster; c != nil {
					// The marks stay until every live broker is done
					// with its held link for name: one whose gossip sees
					// name alive later than this node's, or whose link
					// reaches it again, hands what it held to the
					// sessions adopted from it then (resendReached,
					// resendRestarted), maybe long after this.
					c.markAfterHold(name, c.peers.hold, func() bool {
						_, failed := d.brokers()
						return failed[name]
					})
				}
				d.mu.Lock()
				delete(d.heldDoneSent, name)
				d.mu.Unlock()
			}
		}
		for name := range failed {
			episode[name] = true
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
			start := time.Now()
			among := live
			if d.fail.since(name) > adoptOtherGrace {
				// Sessions still the failed node's this long after this
				// node's round: the survivor they hash to fails its
				// rounds, or sees other live brokers. Any survivor takes
				// them, in one round (the claims keep it to one), rather
				// than each of their CONNECTs alone.
				among = []string{d.node}
			}
			d.fail.begin(name)
			n, err := d.adoptFrom(ctx, name, among)
			d.fail.end(name)
			cancel()
			if err != nil {
				d.log.Warn("sessions of a failed node not adopted yet; retrying", "node", name, "error", err)
				delete(scanned, name)
			} else {
				d.fail.roundDone(name)
				if n > 0 {
					d.log.Info("adopted the persistent sessions of a failed node", "node", name, "sessions", n, "took", time.Since(start))
				}
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
// Its store calls do not grow with the sessions but for one update each:
// on FerretDB v1 every query other than a lookup by _id reads its whole
// collection, so the sessions, their clients' presence, the claims' check
// and the held messages are each read in one query for them all.
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
	var ids []string
	for _, s := range docs {
		if rendezvousName(s.ID, live) == d.node {
			mine = append(mine, s)
			ids = append(ids, s.ID)
		}
	}
	if len(mine) == 0 {
		return 0, nil
	}
	pres, err := d.st.Presences(ctx, ids)
	if err != nil {
		return 0, err
	}
	kept := mine[:0]
	for _, s := range mine {
		// A client that reconnected to a live node while the dead one was
		// only suspected has a newer session there: adopting the stored
		// one would hold a second session for the ID (the heal exchange
		// ends whichever is older, late) and deliver its messages twice
		// and late. Its stale messages are not adopted (see
		// docs/clustering.md, "Durability").
		if p, ok := pres[s.ID]; ok && p.Online && p.Node != dead && slices.Contains(live, p.Node) {
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
		kept = append(kept, s)
	}
	return d.claim(ctx, kept, true)
}

// claimChunk bounds the claims inserted by one command.
const claimChunk = 100

// claim takes each session of docs from its owner and installs those it
// got. fireWills: their clients are gone, so a will still pending is
// published (after its delay).
//
// A claim is an insert under a unique _id first: FerretDB v1 runs a
// conditional update as a read then a write, so two nodes could both
// "win" one; only one insert of an _id succeeds, on every server. The
// documents won are read again (their owner and epoch must be those the
// claim names), then each is written by _id just before it is installed,
// so a session is owned in the store only from the moment it is about to
// be in memory (a peer's CONNECT that finds this node named the owner
// claims it over the link, and that claim waits for the install).
func (d *durableHook) claim(ctx context.Context, docs []sessionDoc, fireWills bool) (int, error) {
	if len(docs) == 0 {
		return 0, nil
	}
	sc := d.st.DB().Collection(store.CollSessions)
	if !fireWills {
		for i := range docs {
			docs[i].Will = nil
		}
	}
	// Marked until installed: a CONNECT of the client here waits
	// (claimOnConnect), instead of getting a new empty session the
	// adoption then merges into unsent.
	marked := map[string]bool{}
	for _, s := range docs {
		d.adoptions.begin(s.ID)
		marked[s.ID] = true
	}
	unmark := func(id string) {
		if marked[id] {
			delete(marked, id)
			d.adoptions.end(id)
		}
	}
	defer func() {
		for id := range marked {
			d.adoptions.end(id)
		}
	}()

	won, err := d.insertClaims(ctx, docs)
	// taken: the sessions whose owner this node wrote. A claim won and not
	// taken, whatever the return, goes: it names this node, and with the
	// failed owner's document unchanged the next round's claim has the
	// same _id (the round would think another node took it, and nobody
	// would).
	taken := map[string]bool{}
	defer func() {
		var left, done []sessionDoc
		for i, s := range docs {
			switch {
			case won[i] && taken[s.ID]:
				done = append(done, s) // its purpose is over (durable_claims.go)
			case won[i]:
				left = append(left, s)
			}
		}
		d.dropClaims(left)
		d.dropTakenClaims(done)
		d.adoptions.releaseClaims(docs, won)
	}()
	if err != nil {
		return 0, err
	}
	if f := d.adoptions.testAfterClaims.Load(); f != nil {
		if err := (*f)(); err != nil {
			return 0, err
		}
	}
	var ids []string
	for i, s := range docs {
		if won[i] {
			ids = append(ids, s.ID)
		} else {
			unmark(s.ID) // another node took it first
		}
	}
	if len(ids) == 0 {
		return 0, nil
	}
	cur := map[string]sessionDoc{}
	filter := bson.D{{Key: "_id", Value: ids[0]}}
	if len(ids) > 1 {
		filter = bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}}
	}
	c, err := sc.Find(ctx, filter)
	if err != nil {
		return 0, err
	}
	var now []sessionDoc
	if err := c.All(ctx, &now); err != nil {
		return 0, err
	}
	for _, s := range now {
		cur[s.ID] = s
	}
	var mine []sessionDoc
	for i, s := range docs {
		if !won[i] {
			continue
		}
		if n, ok := cur[s.ID]; !ok || n.Owner != s.Owner || n.Epoch != s.Epoch {
			unmark(s.ID) // changed since it was read: another node took it
			continue
		}
		mine = append(mine, s)
	}

	got := 0
	var claimErr error
	prev := ""
	var adoptedAt int64 // marked adopted (restoreMark) only from a failed node
	if fireWills {
		adoptedAt = time.Now().UnixMilli()
	}
	at := make(map[string]int, len(mine))
	for i, s := range mine {
		at[s.ID] = i
	}
	// Adopted from an adopter that died during an earlier failover: the
	// marks of that failover stay (cluster_failover.go, carriedMarks).
	var carried map[string][]earlierMark
	if c := d.b.cluster; c != nil && fireWills {
		now := time.Now()
		for i := range mine {
			if m := c.carriedMarks(&mine[i], now); len(m) > 0 {
				if carried == nil {
					carried = map[string][]earlierMark{}
				}
				carried[mine[i].ID] = m
			}
		}
	}
	take := func(s *sessionDoc) bool {
		// The previous one is installed (restore installs each session
		// right after take): its CONNECT need not wait for the rest.
		unmark(prev)
		prev = s.ID
		// The owner is written for the next ownerChunk sessions in one
		// command, just before the first of them is installed.
		if i := at[s.ID]; i%ownerChunk == 0 && claimErr == nil {
			t, err := d.writeOwners(ctx, mine[i:min(i+ownerChunk, len(mine))], adoptedAt, carried)
			if err != nil {
				claimErr = err
			}
			for id := range t {
				taken[id] = true
			}
		}
		if !taken[s.ID] {
			return false
		}
		s.Owner, s.Epoch, s.AdoptedFrom, s.AdoptedAt, s.AdoptedEarlier = d.node, s.Epoch+1, s.Owner, adoptedAt, carried[s.ID]
		got++
		if f := d.testAfterClaim.Load(); f != nil {
			(*f)(s.ID)
		}
		if c := d.b.cluster; c != nil {
			if fireWills {
				// Adopted from a failed node (not taken alone from one
				// gone from gossip): what the survivors' held links kept
				// for that node reaches it through their copy alone, in
				// order (cluster_failover.go). The marks it keeps from
				// the adopter that died come first: older.
				c.adoptAgain(s.ID, s.AdoptedEarlier, s.AdoptedFrom)
				filters := subFilters(s.Subs)
				for _, e := range s.AdoptedEarlier {
					c.adoptedGroups.add(e.From, s.ID, filters)
				}
				c.adoptedGroups.add(s.AdoptedFrom, s.ID, filters)
			}
			// Established here now: should the node it came from turn out
			// alive (a partition), the heal keeps this copy, the durable
			// one, and ends that node's stale one.
			c.owners.set(s.ID, time.Now())
		}
		return true
	}
	_, err = d.restore(ctx, mine, time.Now().Unix(), int64(d.b.cfg.SessionExpiry/time.Second), fireWills, take)
	d.adopted.Add(int64(got))
	return got, errors.Join(claimErr, err)
}

// ownerChunk is how many adopted sessions' owners one command writes
// (store.MaxStatementsPerCommand).
const ownerChunk = store.MaxStatementsPerCommand

// writeOwners names this node the owner of the stored sessions docs
// (claimed), by _id, adopted at (Unix milliseconds) with the earlier marks
// each keeps, and returns those written. After an error that leaves it
// unknown which were, they are read again.
func (d *durableHook) writeOwners(ctx context.Context, docs []sessionDoc, at int64, earlier map[string][]earlierMark) (map[string]bool, error) {
	sc := d.st.DB().Collection(store.CollSessions)
	models := make([]mongo.WriteModel, len(docs))
	for i, s := range docs {
		set := bson.D{{Key: "owner", Value: d.node}, {Key: "epoch", Value: s.Epoch + 1}, {Key: "adopted_from", Value: s.Owner}, {Key: "adopted_at", Value: at}}
		update := bson.D{{Key: "$unset", Value: bson.D{{Key: "adopted_earlier", Value: ""}}}}
		if e := earlier[s.ID]; len(e) > 0 {
			set, update = append(set, bson.E{Key: "adopted_earlier", Value: e}), nil
		}
		if s.PID != 0 {
			// Recorded before the session is installed, where it goes on
			// from (restore): should this node die too, the next one goes
			// on past what this one used.
			set = append(set, bson.E{Key: "pid", Value: uint16(pidResume(s.PID))})
		}
		models[i] = mongo.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: s.ID}}).
			SetUpdate(append(bson.D{{Key: "$set", Value: set}}, update...))
	}
	written := make(map[string]bool, len(docs))
	_, err := sc.BulkWrite(ctx, models, options.BulkWrite().SetOrdered(false))
	if err == nil {
		for _, s := range docs {
			written[s.ID] = true
		}
		return written, nil
	}
	ids := make([]string, len(docs))
	for i, s := range docs {
		ids[i] = s.ID
	}
	rctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	c, rerr := sc.Find(rctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}})
	var now []sessionDoc
	if rerr == nil {
		rerr = c.All(rctx, &now)
	}
	if rerr != nil {
		// Which were written is not known: those that were are owned
		// here and not installed until this node restarts (its load).
		d.log.Error("adopted sessions' owner written, maybe, and not read back: they are served after this node restarts", "sessions", len(docs), "error", errors.Join(err, rerr))
		return written, err
	}
	epoch := map[string]int64{}
	for _, s := range docs {
		epoch[s.ID] = s.Epoch + 1
	}
	for _, s := range now {
		if s.Owner == d.node && s.Epoch == epoch[s.ID] {
			written[s.ID] = true
		}
	}
	return written, err
}

// claimID is a session's claim: one per owner, epoch and version of its
// stored document.
func claimID(s *sessionDoc) string {
	return fmt.Sprintf("%s|%s|%d|%d", s.ID, s.Owner, s.Epoch, s.Updated.UnixNano())
}

// insertClaims inserts the claims of docs, in commands of claimChunk, and
// reports which this node won: a duplicate is another node's, or one this
// node left (it stopped before it could drop it: a crash, a failed drop),
// which it wins again unless a claim of its own under way holds it. After
// an error, won has the claims inserted until then (those of the failing
// command too, as the drop is by _id and node).
func (d *durableHook) insertClaims(ctx context.Context, docs []sessionDoc) ([]bool, error) {
	cc := d.st.DB().Collection(store.CollSessionClaims)
	won := make([]bool, len(docs))
	// Reserved here first: a duplicate naming this node is then known to
	// be a leftover, not a concurrent claim of this node's.
	mine := d.adoptions.reserveClaims(docs)
	defer func() {
		// Those won stay reserved until the caller is done with them.
		lost := make([]bool, len(docs))
		for i := range docs {
			lost[i] = mine[i] && !won[i]
		}
		d.adoptions.releaseClaims(docs, lost)
	}()
	at := time.Now().UTC()
	for off := 0; off < len(docs); off += claimChunk {
		var claims []any
		var idx []int
		for i := off; i < min(off+claimChunk, len(docs)); i++ {
			if mine[i] {
				claims = append(claims, bson.D{{Key: "_id", Value: claimID(&docs[i])}, {Key: "node", Value: d.node}, {Key: "at", Value: at}})
				idx = append(idx, i)
				won[i] = true
			}
		}
		if len(claims) == 0 {
			continue
		}
		_, err := cc.InsertMany(ctx, claims, options.InsertMany().SetOrdered(false))
		if err == nil {
			continue
		}
		var bwe mongo.BulkWriteException
		if !errors.As(err, &bwe) || bwe.WriteConcernError != nil {
			return won, err
		}
		var dup []string
		for _, we := range bwe.WriteErrors {
			if !mongo.IsDuplicateKeyError(we) {
				return won, err
			}
			won[idx[we.Index]] = false
			dup = append(dup, claimID(&docs[idx[we.Index]]))
		}
		c, err := cc.Find(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: dup}}}, {Key: "node", Value: d.node}})
		if err != nil {
			return won, err
		}
		var left []struct {
			ID string `bson:"_id"`
		}
		if err := c.All(ctx, &left); err != nil {
			return won, err
		}
		ours := map[string]bool{}
		for _, l := range left {
			ours[l.ID] = true
		}
		for _, i := range idx {
			if !won[i] && ours[claimID(&docs[i])] {
				won[i] = true
			}
		}
	}
	return won, nil
}

// dropClaims deletes the claims of docs.
func (d *durableHook) dropClaims(docs []sessionDoc) {
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	cc := d.st.DB().Collection(store.CollSessionClaims)
	for i := range docs {
		if _, err := cc.DeleteOne(ctx, bson.D{{Key: "_id", Value: claimID(&docs[i])}, {Key: "node", Value: d.node}}); err != nil {
			d.log.Warn("claim of a session not taken not removed: a node comes back for it only after a restart", "client_id", docs[i].ID, "error", err)
		}
	}
}

// connectClaimWait bounds how long a CONNECT waits for its stored session
// to be adopted (gossip's verdict on its node, then the adoption) before
// it is refused to retry.
const connectClaimWait = 10 * time.Second

// refusedRetry is the CONNACK of a CONNECT refused while the session it
// resumes is being recovered: 0x88 (v3.1.1: 3), with a reason string for
// MQTT 5 clients and people reading their logs.
var refusedRetry = packets.Code{Code: packets.ErrServerUnavailable.Code,
	Reason: "server unavailable: this client's session is being recovered from a node that failed; retry in a few seconds"}

// claimOnConnect finds, for a client reconnecting with clean start false,
// its stored session when the node that held it is not alive, so that the
// client finds it even when it reconnects before failure detection (or the
// adoption) ended:
//
//   - owned by a live node that is unreachable (gossip suspects it, its link
//     is down): the CONNECT waits for gossip's verdict; declared failed,
//     it goes on as below, reachable again, the usual link claim moves it;
//   - owned by a failed node: the CONNECT waits for this node's adoption of
//     that node's sessions (one pass for them all), then for the store to
//     name the adopter; the link claim then moves it from the adopter;
//   - owned by a node that is gone from gossip (it left): taken here alone.
//
// A session a failed node still owns adoptOtherGrace after this node's
// round is taken by this node's next round (watchFailures).
//
// A CONNECT that cannot be settled within connectClaimWait is refused
// (0x88, retry) rather than given an empty session: the survivors would
// then drop the stored one as superseded.
func (d *durableHook) claimOnConnect(cl *mqtt.Client) {
	if d.b.cluster == nil {
		return
	}
	// Its place among the client's CONNECTs is where it starts waiting.
	d.b.cluster.connects.begin(cl)
	ctx, cancel := context.WithTimeout(d.ctx, connectClaimWait)
	defer cancel()
	refuse := func(msg string, args ...any) {
		d.refusedOwnerUnreachable.Add(1)
		d.log.Debug(msg, append([]any{"client_id", cl.ID}, args...)...)
		cl.RefuseSession(refusedRetry)
	}
	// An adoption of this client's session under way here finishes first:
	// the CONNECT then inherits it.
	if !d.adoptions.wait(ctx, cl.ID) {
		d.log.Warn("CONNECT went on while its session was still being adopted", "client_id", cl.ID)
	}
	pause := 100 * time.Millisecond
	for {
		var s sessionDoc
		err := d.st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: cl.ID}}).Decode(&s)
		live, failed := d.brokers()
		if err != nil && !errors.Is(err, mongo.ErrNoDocuments) && len(failed) > 0 {
			// The store does not answer while a node is down: the session
			// may be that node's. The client retries rather than start
			// empty.
			refuse("client refused: its stored session could not be read while a node is down", "error", err)
			return
		}
		if err != nil || s.Owner == d.node || s.WillOnly {
			return
		}
		switch {
		case slices.Contains(live, s.Owner):
			if !d.b.cluster.unreachable(s.Owner) {
				return // the link claim moves it
			}
			// Its owner may have died with it, not yet declared failed:
			// an empty session now would be the client's, and the stored
			// one, once its owner is declared failed, would be dropped as
			// superseded. Gossip decides within its failure-detection
			// bound; until then the store is not read again (a fleet waits
			// here at once).
			if !d.awaitVerdict(ctx, s.Owner) {
				refuse("client refused: the node holding its session is unreachable and not yet declared failed", "owner", s.Owner)
				return
			}
			continue
		case failed[s.Owner]:
			round := d.fail.round(s.Owner)
			select {
			case <-round:
			default:
				select {
				case d.fail.kick <- struct{}{}:
				default:
				}
				select {
				case <-round:
				case <-ctx.Done():
					refuse("client refused: the adoption of its failed node's sessions did not end in time", "owner", s.Owner)
					return
				}
				continue // the store names its adopter now
			}
			// Another survivor adopts it (rendezvous among the live
			// brokers): its round writes the owner soon. Should it not,
			// this node's rounds take it after adoptOtherGrace. Not this
			// CONNECT alone: each such claim reads the held messages (on
			// FerretDB a pass over them all), and a fleet of them kept the
			// rounds from finishing.
		default:
			// Gone from gossip (it left, handing its sessions over, or was
			// reaped): nobody adopts it in a round.
			d.claimAlone(ctx, cl, s)
			return
		}
		select {
		case <-time.After(pause):
			pause = min(2*pause, 2*time.Second)
		case <-ctx.Done():
			refuse("client refused: the node holding its session is unreachable and not yet declared failed, or its adopter has not taken it yet", "owner", s.Owner)
			return
		}
	}
}

// awaitVerdict waits until gossip declares the live broker owner failed or
// it is reachable again; false if ctx ended first.
func (d *durableHook) awaitVerdict(ctx context.Context, owner string) bool {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		live, failed := d.brokers()
		if failed[owner] || !slices.Contains(live, owner) || !d.b.cluster.unreachable(owner) {
			return true
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return false
		}
	}
}

// adoptOtherGrace is how long after this node's first adoption round of a
// failed node its later rounds stop leaving sessions to the survivor they
// hash to, and take them all.
const adoptOtherGrace = 20 * time.Second

// claimAlone takes the stored session s of a client connecting here from a
// node that is not alive.
func (d *durableHook) claimAlone(ctx context.Context, cl *mqtt.Client, s sessionDoc) {
	n, err := d.claim(ctx, []sessionDoc{s}, false)
	switch {
	case err != nil:
		// Not an empty session instead: the client retries.
		d.log.Warn("client refused: the stored session of a node that is gone could not be taken", "client_id", cl.ID, "owner", s.Owner, "error", err)
		d.refusedOwnerUnreachable.Add(1)
		cl.RefuseSession(refusedRetry)
	case n > 0:
		d.log.Info("took the stored session of a node that is gone", "client_id", cl.ID, "owner", s.Owner)
	default:
		// A survivor's adoption claimed it first and may not have
		// installed it yet, so the link claim below would not find it:
		// the client retries, and then moves it from its adopter.
		d.refusedOwnerUnreachable.Add(1)
		cl.RefuseSession(refusedRetry)
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
	cl.RefuseSession(refusedRetry)
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
	p := c.peers.getHeld(dead)
	if p != nil && p.reached.Load() {
		if p.resent.Load() {
			// Its link reached dead again and what it held was sent on
			// (resendReached, resendRestarted), which told the cluster
			// (heldHandedOver); the link, which holds nothing more,
			// stays until gossip sees dead alive.
			d.mu.Lock()
			if d.heldDoneSent == nil {
				d.heldDoneSent = map[string]bool{}
			}
			d.heldDoneSent[dead] = true
			d.mu.Unlock()
		}
		return nil
	}
	if p == nil {
		if c.peers.isExpiring(dead) {
			// Its hold ran out and the link is closing, handing its
			// queue to the sessions adopted so far (resendExpired): the
			// cluster is told after that, or their adopters could drop
			// the marks those copies need.
			return nil
		}
		// Gossip's verdict may not have reached the links yet (syncPeers
		// runs on its own goroutine): the link to dead, maybe with
		// messages queued for it, is about to be held. Telling the
		// cluster "done" now would let the adopters drop the marks its
		// held copies need (skipped there: lost, not counted); so only
		// after a sync that read gossip after this point.
		if !d.syncedNothingHeld(dead) {
			return nil // asked again at the next poll
		}
		d.heldDone(dead) // nothing held (or sent on already)
		return nil
	}
	sc := d.st.DB().Collection(store.CollSessions)
	left, err := sc.CountDocuments(ctx, bson.D{{Key: "owner", Value: dead}})
	if err != nil || left > 0 {
		return err
	}
	// A session adopted again from an adopter that died keeps dead's mark
	// as an earlier one (carriedMarks).
	cur, err := sc.Find(ctx, bson.D{{Key: "$or", Value: bson.A{
		bson.D{{Key: "adopted_from", Value: dead}},
		bson.D{{Key: "adopted_earlier.from", Value: dead}},
	}}})
	if err != nil {
		return err
	}
	var docs []sessionDoc
	if err := cur.All(ctx, &docs); err != nil {
		return err
	}
	_, failed := d.brokers()
	var adopters []string
	for _, s := range docs {
		if failed[s.Owner] {
			// Its adopter died too: the held copies go once a survivor
			// adopted it again (from the adopter, keeping dead's mark),
			// not into the held link of the adopter, whose own
			// hand-over would give them as its held copies, which a
			// session marked from dead too skips (heldSkip).
			return nil
		}
		if !slices.Contains(adopters, s.Owner) {
			adopters = append(adopters, s.Owner)
		}
	}
	if len(adopters) == 0 {
		// It owned no persistent session: its routes go, as without
		// durability, and its link stays held (cluster.failed_peer_hold).
		// As there (syncPeers' forget), its inbound connection is closed:
		// should it be alive after all (gossip alone cut off), it redials
		// and sends its routes again. Before, a snapshot it had sent on a
		// redial after the verdict went with them, and nothing sent them
		// again: its subscribers got nothing from here for good.
		// Once per failure (heldDone, below, marks it): this runs at every
		// adoption poll while dead stays failed, and a link closed at
		// each made it redial with a full snapshot every 250 ms (review
		// rv13l11 F-A).
		d.mu.Lock()
		once := !d.heldDoneSent[dead]
		d.mu.Unlock()
		c.routes.mu.Lock()
		dropped := once && c.peers.getHeld(dead) != nil
		if dropped {
			c.routes.dropLocked(dead)
		}
		c.routes.mu.Unlock()
		if dropped {
			c.links.Forget(dead)
		}
		d.heldDone(dead)
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
	if p.reached.Load() { // since the check above
		c.routes.mu.Unlock()
		return nil
	}
	p = c.peers.releaseHeld(dead)
	if p != nil {
		// Begun before the routes go: a forward that finds them gone
		// queues after the held messages (cluster_failover.go).
		c.heldFlush.begin(adopters)
		c.routes.releaseLocked(dead)
	}
	c.routes.mu.Unlock()
	if p == nil {
		return nil
	}
	defer c.heldFlush.end(adopters)
	d.mu.Lock()
	d.reforwardTo[dead] = adopters
	d.mu.Unlock()
	d.log.Info("failed node's sessions adopted: what was queued for it goes to the adopters", "node", dead,
		"adopters", adopters, "queued", p.link.Stats().QueueLen)
	p.link.Close() // hands the queue to discarded, then reforward
	d.mu.Lock()
	delete(d.reforwardTo, dead) // an empty queue is not handed over
	d.mu.Unlock()
	d.heldDone(dead)
	return nil
}

// syncedNothingHeld reports whether this node holds no link for dead once
// its links follow a member list read after this watcher's: the links
// follow gossip apart from it (syncPeers) and may not have held dead's
// link yet. Said "done" before its hold, the node let the adopters drop
// their marks (every broker done) before the held copies it then sends
// on: the sessions skip them, and what reached them only through its held
// link (published while they were being adopted) was lost, not counted.
// Once said, nothing more is asked; nor while the node stops, when its
// peers are gone, not done.
func (d *durableHook) syncedNothingHeld(dead string) bool {
	d.mu.Lock()
	sent := d.heldDoneSent[dead]
	d.mu.Unlock()
	if sent {
		return true
	}
	c := d.b.cluster
	if !c.syncedAfter(time.Second) {
		return false
	}
	return c.peers.getHeld(dead) == nil && !c.peers.isExpiring(dead)
}

// heldDone tells the cluster, once per failure of dead, that this node sent
// on what it held for dead (cluster_failover.go).
func (d *durableHook) heldDone(dead string) {
	d.mu.Lock()
	sent := d.heldDoneSent[dead]
	if d.heldDoneSent == nil {
		d.heldDoneSent = map[string]bool{}
	}
	d.heldDoneSent[dead] = true
	d.mu.Unlock()
	if !sent {
		// Through heldHandedOver, after in-flight forwards that marked a
		// message held for dead: dead may be back alive and its held link
		// handed over by a sync after this watcher's round began; a word
		// sent at once went ahead of that hand-over's re-sends, and the
		// adopters dropped the marks those copies need (review rv13l11 F-B).
		d.b.cluster.heldHandedOver(dead)
	}
}

// reforward sends the publishes a released peer's link held on, to the
// sessions adopted from it wherever they are now (resendHeld), in the
// order they were queued. It reports false for a link not released that
// way (its queue is counted lost by the caller).
func (c *clusterNode) reforward(l *link.Link, msgs []link.Message) bool {
	d := c.b.durable
	if d == nil {
		return false
	}
	peer := l.Peer()
	d.mu.Lock()
	adopters, ok := d.reforwardTo[peer]
	delete(d.reforwardTo, peer)
	d.mu.Unlock()
	if !ok {
		return false
	}
	pms := make([]publishMsg, 0, len(msgs))
	for _, m := range msgs {
		if m.Type != msgPublish {
			continue
		}
		pm, err := decodePublish(m.Body)
		if err != nil {
			c.log.Error("held message not sent on: cannot decode it", "peer", peer, "error", err)
			continue
		}
		pm.src = linkMark{l: l, seq: m.Seq}
		pms = append(pms, pm)
	}
	c.resendHeld(peer, adopters, pms)
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
// node's own writes insert it; counted, durability.moved_in_no_document).
// Giving up is logged and counted (durability.moved_in_failed). A client
// here that keeps no stored session (no persistent session, no will) has
// the document deleted instead (durability.moved_in_stale_deleted). Once taken over, the last document of the
// session this node's writes were refused for meanwhile is queued again
// (redoUnstored); otherwise it is rewritten as this node holds the session
// at its next change (written here, not from this goroutine: the client's
// own goroutine owns its will).
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
			d.mu.Lock()
			// keep: the client here has a session document to write (it is
			// persistent, or has a will). Otherwise the document is stale:
			// the source's late write, landed after the delete of this
			// client's clean start found nothing; taken over, it would bring
			// back the old subscriptions at this node's restart and fire the
			// old will at its death: deleted instead.
			keep := d.known[id]
			_, gone := d.gone[id]
			d.mu.Unlock()
			if gone {
				return // handed on to another node, which takes it
			}
			ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
			var doc struct {
				Owner string `bson:"owner"`
			}
			err := sc.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&doc)
			var res *mongo.UpdateResult
			deleted := false
			if err == nil && (doc.Owner == from || (doc.Owner == d.node && !keep)) {
				// By _id alone after the read on FerretDB v1, which scans the
				// collection for _id and owner together (once per session
				// moved: quadratic for a fleet moving after a node's death)
				// and whose conditional update is a read then a write anyway;
				// conditional on the owner where the server makes it atomic.
				filter := bson.D{{Key: "_id", Value: id}}
				if !d.st.IDOnly() {
					filter = append(filter, bson.E{Key: "owner", Value: doc.Owner})
				}
				if keep {
					res, err = sc.UpdateOne(ctx, filter, d.takeUpdate(id))
				} else {
					_, err = sc.DeleteOne(ctx, filter)
					deleted = err == nil
				}
			}
			cancel()
			switch {
			case deleted:
				d.movedInStale.Add(1)
				d.log.Info("stale stored session of a moved-in client that keeps none deleted", "client_id", id, "from", from)
				return
			case err == nil && (doc.Owner == d.node || (res != nil && res.MatchedCount > 0)):
				d.mu.Lock()
				keep = d.known[id]
				d.mu.Unlock()
				if !keep {
					// Its clean start's delete may have run before the
					// take-over: deleted at the next round.
					continue
				}
				d.log.Debug("stored session taken over from the node it moved from", "client_id", id, "from", from)
				d.redoUnstored(id)
				return
			case err == nil && doc.Owner != from:
				d.log.Info("stored session of a moved-in client owned by another node: not taken over", "client_id", id, "from", from, "owner", doc.Owner)
				return
			case errors.Is(err, mongo.ErrNoDocuments) && time.Since(began) > movedInNoDoc:
				// Nothing to take (the source never wrote it, or it was
				// deleted): this node's own writes insert it, if any.
				d.movedInNoDoc.Add(1)
				return
			case time.Since(began) > movedInMax:
				d.movedInFailed.Add(1)
				d.log.Warn("stored session of a moved-in client not taken over: its old node stays the stored owner", "client_id", id, "from", from, "error", err)
				return
			}
		}
	}()
}

// movedMark records the mark "adopted from dead at" (Unix milliseconds)
// of client id's session, which just moved here ("": none), for this
// node's writes of its stored document, so that a restart of this node
// during the failover marks the restored session again (restore,
// restoreMark) and it still takes what the survivors held for dead (before,
// the mark moved in memory only, and the held copies released after such a
// restart skipped the session: lost, not counted). Without the adopter's
// time (a sender that does not carry it) the move-in's stands in: the mark
// restored then lasts longer, up to cluster.failed_peer_hold from here,
// which makes the session skip only copies marked held for dead.
func (d *durableHook) movedMark(id, dead string, at int64, earlier []earlierMark) {
	if dead != "" && at <= 0 {
		at = time.Now().UnixMilli()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.epoch[id]
	if dead == "" {
		if !ok {
			return // nothing to clear
		}
		at, earlier = 0, nil
	}
	for i := range earlier {
		if earlier[i].At <= 0 {
			earlier[i].At = at
		}
	}
	e.from, e.at, e.earlier = dead, at, earlier
	d.epoch[id] = e
}

// markAt returns when client id's session was adopted from dead (Unix
// milliseconds), as this node stores it, or 0.
func (d *durableHook) markAt(id, dead string) int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.epoch[id]
	if e.from == dead {
		return e.at
	}
	for _, m := range e.earlier {
		if m.From == dead {
			return m.At
		}
	}
	return 0
}

// takeUpdate is the update by which this node takes client id's stored
// session over from the node it moved from (takeStored, movedIn): owner
// and epoch, and the session's mark as this node holds it (movedMark),
// since the session's own write may not come (a session pushed here) and
// the document holds the source's: without the mark, one that no longer
// applies (the marks cleared) is removed.
func (d *durableHook) takeUpdate(id string) bson.D {
	d.mu.Lock()
	e := d.epoch[id]
	d.mu.Unlock()
	set := bson.D{{Key: "owner", Value: d.node}}
	u := bson.D{{Key: "$inc", Value: bson.D{{Key: "epoch", Value: 1}}}}
	if e.from != "" && e.at > 0 {
		set = append(set, bson.E{Key: "adopted_from", Value: e.from}, bson.E{Key: "adopted_at", Value: e.at})
		if len(e.earlier) > 0 {
			set = append(set, bson.E{Key: "adopted_earlier", Value: e.earlier})
		} else {
			u = append(u, bson.E{Key: "$unset", Value: bson.D{{Key: "adopted_earlier", Value: ""}}})
		}
	} else {
		u = append(u, bson.E{Key: "$unset", Value: bson.D{{Key: "adopted_from", Value: ""}, {Key: "adopted_at", Value: ""}, {Key: "adopted_earlier", Value: ""}}})
	}
	return append(bson.D{{Key: "$set", Value: set}}, u...)
}

// redoUnstored queues again the last session document of client id that
// was refused while another node owned the stored session (see
// durableHook.unstored), now that this node owns it: the document taken
// over is the source's, without the changes made here since.
func (d *durableHook) redoUnstored(id string) {
	d.mu.Lock()
	doc := d.unstored[id]
	d.mu.Unlock()
	if doc != nil {
		_, _ = d.put(durOp{kind: opSession, client: id, sess: doc, redo: true})
	}
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
	claims  map[string]bool // claim _ids this node's claims under way insert
	waiting atomic.Int64    // CONNECTs waiting (tests)

	testAfterClaims atomic.Pointer[func() error] // tests: a store error after the claims' insert
}

// reserveClaims marks the claims of docs as this node's under way and
// reports which were not already.
func (a *adoptions) reserveClaims(docs []sessionDoc) []bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.claims == nil {
		a.claims = map[string]bool{}
	}
	got := make([]bool, len(docs))
	for i := range docs {
		if id := claimID(&docs[i]); !a.claims[id] {
			a.claims[id] = true
			got[i] = true
		}
	}
	return got
}

// releaseClaims ends the reservations of the docs marked in which.
func (a *adoptions) releaseClaims(docs []sessionDoc, which []bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range docs {
		if which[i] {
			delete(a.claims, claimID(&docs[i]))
		}
	}
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

// busy reports whether an adoption of id is under way.
func (a *adoptions) busy(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m[id] != nil
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

// storedOwnerAdopted reports whether the stored session of client id is
// owned by a failed broker a round under way here adopts from (a store
// that does not answer: maybe).
func (d *durableHook) storedOwnerAdopted(ctx context.Context, id string) bool {
	var s sessionDoc
	err := d.st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&s)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return false
	}
	return err != nil || d.fail.adopting(s.Owner)
}
