// Package broker is rtm's MQTT broker role: one node built on mochi-mqtt v2
// that speaks MQTT 3.1.1 and 5.0 over TCP, WebSocket (/mqtt) and, when a
// certificate is configured, TLS and secure WebSocket, and serves the admin
// HTTP endpoints /healthz, /readyz, /metrics and /v1/stats.
//
// A Broker is created by New (no I/O), started by Start (returns once every
// listener is bound) and stopped by Shutdown (idempotent, bounded by its
// context). Its methods are safe for concurrent use.
//
// # The cluster part
//
// With cluster.gossip_addr set, a Broker is one node of a cluster
// (docs/clustering.md describes it for users). Its cluster part, clusterNode
// in cluster.go, owns the Serf membership and the node link server
// (package link), and composes parts that each hold one concern and can be
// read and tested alone:
//
//   - peerSet (cluster_peers.go) keeps one outgoing link per broker gossip
//     says is alive, and holds the link of a peer marked failed for
//     cluster.failed_peer_hold with what was queued for it. It knows no
//     routes: sync tells its caller which peers' routes to drop.
//   - routeTable (cluster_routes.go) holds the filters local clients
//     subscribe to (a versioned set, sent to a peer whole when its link
//     connects and then as deltas) and every peer's filters in an index
//     that names the peers a topic must be forwarded to.
//   - Forwarding (cluster_forward.go) is clusterNode's mochi hooks: a
//     publish or will of a local client is queued, before mochi
//     acknowledges it, on the link of every peer whose routes match it.
//   - retainedSync (cluster_retained.go) keeps the retained messages of
//     every node the same, last writer wins by a (time, node) stamp.
//   - Claims (claimWaiters, cluster_claims.go): a CONNECT asks every peer
//     to end its connection with the same client ID, and does not wait for
//     a peer gossip suspects or whose link is down.
//   - Session moves (moves, cluster_move.go): a session moves to the node
//     that claims it, or, when this node stops gracefully, to the live peer
//     rendezvous hashing of the client ID picks (handOver).
//   - Healing (owners, cluster_heal.go): every link opens with the client
//     IDs its sender holds and how old each session is; of two sessions
//     with one ID the older is ended (stale after a partition), the node
//     whose name sorts first deciding for the pair (monotonic ages: no
//     wall clock is compared).
//   - Failover order (adopted, heldFlush, heldDone, cluster_failover.go):
//     a session adopted from a failed node gets what the survivors' held
//     links kept for that node once, through the held copy, before what
//     was published later, and moves on only once every survivor sent
//     its held copies on. A session adopted again from an adopter that
//     died during the failover keeps the earlier failed node's mark
//     beside the adopter's (a session may carry marks for several failed
//     nodes, oldest first, each cleared on its own).
//   - Resume (resumeGuard, cluster_resume.go): a node that finds it did
//     not run for three probe intervals (stopped: its peers may have
//     declared it failed and moved sessions away from the routes it
//     holds) closes its inbound links so its peers send their routes
//     again, and its clients' publishes wait for them (bounded) before
//     their routes are read.
//
// # Session moves
//
// A move is a small protocol on the node links (see cluster_wire.go,
// msgMove*): start (subscriptions), chunks of at most moveChunkBytes of
// queued messages, each acknowledged, at most moveWindow unacknowledged;
// then the source detaches the session, sends what was queued meanwhile
// and the end; the destination installs the session and confirms. The
// destination decides: it confirms only a move whose end arrived while it
// still wanted it, and refuses otherwise (its CONNECT gave up after
// cluster.claim_timeout without progress). The source keeps the session
// until the confirmation and puts a detached session back on a refusal, or
// when the destination is gone from gossip or came back as another process;
// it never puts it back while the destination lives and may still confirm
// (except after moveConfirmMax), so a session is never held twice by nodes
// that both stay up. A CONNECT whose session could not be moved is refused
// with 0x88 (mochi patch 47), so the client retries instead of starting over
// with an empty session. A CONNECT of the client on the source during a
// move it answers is newer than the claimant's: until the detach the move
// gives way to it (yieldTo: the move is aborted, the session stays, the
// claimant is refused); after it, that CONNECT is refused and its retry
// claims the session back. The source keeps its routes for the session's
// filters, and relays what still reaches it for the session to the
// destination (msgMoveLate, after the move's end), until the destination
// reports that every peer acknowledged its own routes for the session
// (msgMoveRouted): no node is without a route for the session in between
// (cluster_relay.go).
//
// Every message that reaches the source for the moved session is either
// delivered to it before the detach (and moves with it) or relayed: the
// relay is registered (startRelay) before DetachSession removes the
// session's subscriptions and client, and the relay lookup of a message
// runs after its local delivery (relayFromPeer after DeliverFromPeer;
// OnPublished, OnWillSent for local publishers). A delivery that found
// the subscription gone, or the client taken over, saw the detach, so the
// lookup after it sees the relay (the relay outlives the move's end by at
// least the destination's route round trip; a delivery slower than that
// is the one case left). The lookup for local publishers does not run in
// OnPublish with the forwarding: a session detached between the two was
// found by neither. A message is relayed even if the destination routes
// its topic itself: the direct copy can precede the move's end there, and
// so the session; the duplicate is within QoS 1. Once the destination
// reports the session installed (after its routes for it, on the same
// link), what it publishes and what this node's clients publish reach the
// session directly and are not relayed (relay.installed). A relay holds at most
// relayKeepMax messages and relayHeldBytesMax bytes before the move's end
// is queued; a local QoS 1/2 publish beyond that is refused (no PUBACK),
// anything else counted (move_relay_full).
//
// A move answering a claim whose CONNECT went on
// without it (the source was cut off) finds a newer session at the
// destination: the source drops its own as stale.
//
// For durable sessions (the store), the owner of a client ID is the node
// holding its live session as decided here: a node must not adopt a session
// from the store while gossip only suspects its owner, and a store copy must
// carry the time it was established on its owner, so a stale copy written
// by a node that was cut off loses against the newer session, as above.
// # Contract
//
// A QoS 1/2 PUBLISH acknowledged by this node is queued on every link whose
// peer has a matching route, or refused (0x97 when a link queue is full,
// 0x80 otherwise; with durability 0x80 too when the link reaches another
// process of the peer than the one whose routes matched: a restart whose
// new routes have not arrived). After a stall (resumeGuard) the routes are
// read only once every live peer sent them again, or the bounded wait
// ended; the link then delivers it exactly once while both
// processes stay up (see package link). With durability, its
// acknowledgement also waits until every peer it was queued for has
// acknowledged it on the link (safe there; cluster_forward.go,
// OnPublishHold): a link's queue dies with this process. A message held on
// the link of a failed peer is followed to where the failover hands it on
// (the adopters' links, each acknowledged, or sessions adopted here, their
// writes committed: cluster_handover.go); a hand-over that drops it, this
// node stopping first, or the bound (twice cluster_forward.go's
// peerAckWaitFor) ends the wait without the acknowledgement (the
// connection closes). A QoS 2 PUBREC whose wait failed is not owed by the
// publisher's session (mochi patch 123): the PUBLISH sent again is
// published again; one sent again while the wait is in progress (a QoS 2
// wait outlives its connection) is answered by its outcome. A message a
// link discards is counted
// in rtm_broker_messages_dropped_total with the reason. Routes converge: a
// link's opening snapshot replaces what the peer held, deltas carry a version
// and an older one is ignored. Retained state converges whatever the order
// updates arrive in. A client ID has one connection in the cluster once every
// node that is not suspected answered its claim (bounded by
// cluster.claim_timeout), and one session once a partition healed. A session
// moved between live nodes arrives whole or stays whole where it was, and a
// message published anywhere while it moves reaches it (through its
// non-shared subscriptions; see cluster_relay.go). A node
// stopped gracefully keeps its routes until its sessions are handed over.
//
// # Lock order
//
// Locks are taken in this order, never the reverse, and none is held while
// waiting on the network:
//
//  1. the lock of mochi's TopicsIndex of local subscriptions (onRoute is
//     called with it held);
//  2. routeTable.mu;
//  3. peerSet.mu;
//  4. link.Link.mu and link.Server.mu (leaf locks, see package link), and
//     the lock of routeTable's own index of remote routes (a leaf too).
//
// retainedSync.mu, claimWaiters.mu, moves.mu, owners.mu, relays.mu,
// adoptedMarks.mu, flushGate.mu, heldDone.mu, heldForwardCount.mu,
// resumeGuard.mu and handOvers.mu are leaves: nothing else is locked while
// one is held (a held link's release begins its flushGate with
// routeTable.mu held; a forward waits for the gate with no lock held; a
// forward that marks its message held counts itself with routeTable.mu and
// peerSet.mu held). A relay's own mutex
// (cluster_relay.go) comes before peerSet.mu and the link locks: it is held
// while a relayed message is queued, so relayed messages keep their order. An inMove's mutex comes before
// mochi's locks: the destination installs the session (AdoptSession, which
// locks the index and so calls onRoute) while holding it, so that a move is
// committed or given up, never both. A link's OnUp snapshot takes routeTable.mu and then
// retainedSync.mu, one after the other, on the link's own goroutine with no
// link lock held. syncPeers holds routeTable.mu across peerSet.sync so that
// no forward sees a peer gone while its routes are still there.
package broker
