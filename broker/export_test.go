package broker

import (
	"context"
	"fmt"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
)

// SetTestMembers makes the node's link management see the gossip member
// list as f rewrites it (nil: as it is), so a test can make a peer look
// failed, or alive, without stopping it. Gossip itself is unchanged.
func (b *Broker) SetTestMembers(f func([]cluster.Member) []cluster.Member) {
	if f == nil {
		b.cluster.testMembers.Store(nil)
		return
	}
	b.cluster.testMembers.Store(&f)
}

// FlushStore waits until the node's store writer has written everything
// queued so far (its MinAge not waited for), or ctx ends. KillCluster
// leaves the writer running: a test that restarts a node in process calls
// this first, so what the killed node queued before is not written while
// the new one reads the store.
func (b *Broker) FlushStore(ctx context.Context) error { return b.durable.w.Flush(ctx) }

// SetTestMoveChunk calls f before each chunk of a session move is sent
// (side "source") or taken in ("destination"); nil removes it.
func (b *Broker) SetTestMoveChunk(f func(side string, seq uint64)) {
	if f == nil {
		b.cluster.testMoveChunk.Store(nil)
		return
	}
	b.cluster.testMoveChunk.Store(&f)
}

// KillCluster stops the node's cluster part abruptly, as a kill -9 would
// for its peers: links and gossip close, nothing is handed over or left.
// Its MQTT side keeps running.
func (b *Broker) KillCluster() { b.cluster.shutdown() }

// SetTestAfterClaim calls f each time the node has claimed a stored session
// of a failed node in the store, before it installs it; nil removes it.
func (b *Broker) SetTestAfterClaim(f func(id string)) {
	if f == nil {
		b.durable.testAfterClaim.Store(nil)
		return
	}
	b.durable.testAfterClaim.Store(&f)
}

// SetTestSessionRewrite calls f on the node's store writer once the first
// command that rewrites stored session documents (ids) is done, before the
// batch's next command; nil removes it. A test that blocks in f and starts
// another node on the store sees what a kill -9 there leaves.
func (b *Broker) SetTestSessionRewrite(f func(ids []string)) {
	if f == nil {
		b.durable.testSessionRewrite.Store(nil)
		return
	}
	b.durable.testSessionRewrite.Store(&f)
}

// AdoptionWaiters is the number of CONNECTs waiting for an adoption of
// their session under way on the node.
func (b *Broker) AdoptionWaiters() int64 { return b.durable.adoptions.waiting.Load() }

// HoldRouteDeltas makes the node hold back the route updates that peer
// from sends (and, behind them, everything else from it) until release is
// closed, as a slow link would.
func (b *Broker) HoldRouteDeltas(from string, release <-chan struct{}) {
	f := func(peer string, m link.Message) error {
		if peer == from && m.Type == msgRouteDelta {
			<-release
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}

// SetTestMoveDetached calls f when the node, as the source of a move, has
// just detached the session of client id; nil removes it.
func (b *Broker) SetTestMoveDetached(f func(id string)) {
	if f == nil {
		b.cluster.testMoveDetached.Store(nil)
		return
	}
	b.cluster.testMoveDetached.Store(&f)
}

// SetTestAfterForward calls f after a local publish was forwarded to the
// node's peers, before it is delivered on the node; nil removes it.
func (b *Broker) SetTestAfterForward(f func(topic string)) {
	if f == nil {
		b.cluster.testAfterForward.Store(nil)
		return
	}
	b.cluster.testAfterForward.Store(&f)
}

// SetTestRelayKeep makes the node hold at most n messages for a session
// moving away before the move's end is queued (0: relayKeepMax).
func (b *Broker) SetTestRelayKeep(n int) { b.cluster.testRelayKeep.Store(int32(n)) }

// SetTestRelayBytes makes the node hold at most n payload and topic bytes
// for a session moving away before the move's end is queued (0:
// relayHeldBytesMax).
func (b *Broker) SetTestRelayBytes(n int) { b.cluster.testRelayBytes.Store(int64(n)) }

// SetTestSubscribeWait bounds how long a persistent session's SUBACK waits
// for the store (durableSubscribeMax otherwise).
func (b *Broker) SetTestSubscribeWait(d time.Duration) { b.durable.subscribeWait.Store(int64(d)) }

// InjectStaleMove hands the node, as if peer from sent them on the link,
// the start of a move of client id's session answering a claim nobody
// waits for any more (a partition healed), then a message the source
// relays for that session on topic.
func (b *Broker) InjectStaleMove(from, id, topic string, payload []byte) {
	c := b.cluster
	c.moveStarted(from, moveStartMsg{Move: 1 << 40, Claim: 1 << 40, ClientID: id, Version: 5,
		Subs: []packets.Subscription{{Filter: topic, Qos: 1}}})
	pm := publishMsg{Packet: packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: topic, Payload: payload}, Origin: "pub"}
	c.lateArrived(from, moveLateMsg{ClientID: id, Pub: pm})
}

// SetTestAfterClaims calls f after each adoption's claims are inserted,
// before the sessions are read again: an error it returns is the store's;
// nil removes it.
func (b *Broker) SetTestAfterClaims(f func() error) {
	if f == nil {
		b.durable.adoptions.testAfterClaims.Store(nil)
		return
	}
	b.durable.adoptions.testAfterClaims.Store(&f)
}

// LeaveClaim inserts, as this node, the claim of client id's stored
// session as it is now, as a claim of this node's that stopped before it
// could drop it (a crash, a store error) leaves it.
func (b *Broker) LeaveClaim(ctx context.Context, id string) error {
	var s sessionDoc
	if err := b.durable.st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&s); err != nil {
		return err
	}
	_, err := b.durable.st.DB().Collection(store.CollSessionClaims).InsertOne(ctx,
		bson.D{{Key: "_id", Value: claimID(&s)}, {Key: "node", Value: b.durable.node}, {Key: "at", Value: time.Now().UTC()}})
	return err
}

// PurgeClaims purges the session claims too old, at now, to belong to an
// adoption under way, and returns how many it deleted.
func (b *Broker) PurgeClaims(ctx context.Context, now time.Time) (int64, error) {
	return b.durable.purgeClaims(ctx, now)
}

// ClaimMaxAge is the age from which a session claim is purged.
const ClaimMaxAge = claimMaxAge

// MovedIn starts the take-over in the store of client id's session, moved
// here from node from, as a move whose document was not there yet does.
func (b *Broker) MovedIn(id, from string) { b.durable.movedIn(id, from) }

// SpeakProtocolV1 makes the node behave, on its node links, as a broker of
// a release before cluster protocol versions: it advertises none (version
// 1), sends what version 1 sends, and refuses a move's end with any field
// after the three that release knew (its decoder refused trailing bytes).
func (b *Broker) SpeakProtocolV1() {
	c := b.cluster
	c.testProtocol.Store(protoV1)
	f := func(_ string, m link.Message) error {
		if m.Type != msgMoveEnd {
			return nil
		}
		r := rbuf{b: m.Body}
		r.uvarint()
		r.uvarint()
		r.bool()
		if r.err == nil && len(r.b) != 0 {
			return fmt.Errorf("cluster message: %d bytes after the last field", len(r.b))
		}
		return r.err
	}
	c.testDeliver.Store(&f)
	c.retag()
}

// PeerProtocol is the cluster protocol version the node uses with broker
// name.
func (b *Broker) PeerProtocol(name string) int { return b.cluster.peerProtocol(name) }

// Adopter is the node among live that adopts client id's session when its
// node dies (rendezvous hashing, as the adoption does).
func Adopter(id string, live ...string) string { return rendezvousName(id, live) }

// SetTestBeforeClose calls f when the node has dropped the routes of a
// peer it removes (gone, or failed past cluster.failed_peer_hold), before
// it closes the link; nil removes it.
func (b *Broker) SetTestBeforeClose(f func(peer string)) {
	if f == nil {
		b.cluster.testBeforeClose.Store(nil)
		return
	}
	b.cluster.testBeforeClose.Store(&f)
}

// MoveYieldsAsked is how many moves of a session away from the node a
// newer CONNECT of its client on the node asked to give way.
func (b *Broker) MoveYieldsAsked() int64 { return b.cluster.moveYields.Load() }

// SpeakProtocolV2 makes the node advertise, send and judge as a broker of
// cluster protocol version 2 (partition heal by wall clocks).
func (b *Broker) SpeakProtocolV2() { b.cluster.testProtocol.Store(protoV2) }

// SetTestOwnersHandled calls f each time the node has judged (or
// answered) an owners list from peer from; nil removes it.
func (b *Broker) SetTestOwnersHandled(f func(from string)) {
	if f == nil {
		b.cluster.owners.testHandled.Store(nil)
		return
	}
	b.cluster.owners.testHandled.Store(&f)
}

// SetOwnersSendWait sets how long the node's answers to owners lists
// wait for a link to their node (a minute by default).
func (b *Broker) SetOwnersSendWait(d time.Duration) { b.cluster.owners.sendWait.Store(int64(d)) }

// OwnersNotSent is how many answers to owners lists the node gave up
// for want of a link to their node.
func (b *Broker) OwnersNotSent() int64 { return b.cluster.owners.notSent.Load() }
