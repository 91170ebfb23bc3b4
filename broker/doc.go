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
//   - Claims and session moves (cluster_claims.go): a CONNECT asks every
//     peer to end its connection with the same client ID, and the session
//     moves with the client.
//
// # Contract
//
// A QoS 1/2 PUBLISH acknowledged by this node is queued on every link whose
// peer has a matching route, or refused (0x97 when a link queue is full,
// 0x80 otherwise); the link then delivers it exactly once while both
// processes stay up (see package link). A message a link discards is counted
// in rtm_broker_messages_dropped_total with the reason. Routes converge: a
// link's opening snapshot replaces what the peer held, deltas carry a version
// and an older one is ignored. Retained state converges whatever the order
// updates arrive in. A client ID has one connection in the cluster once every
// node answered its claim (bounded by cluster.claim_timeout).
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
// retainedSync.mu and claimWaiters.mu are leaves: nothing else is locked
// while one is held. A link's OnUp snapshot takes routeTable.mu and then
// retainedSync.mu, one after the other, on the link's own goroutine with no
// link lock held. syncPeers holds routeTable.mu across peerSet.sync so that
// no forward sees a peer gone while its routes are still there.
package broker
