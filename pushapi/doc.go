// Package pushapi is rtm's push API role: the JSON-over-HTTP API (Echo v4)
// that applications use to reach devices. It publishes messages to any
// topic, to push channels (push/{channel}) and to device inboxes
// (devices/{id}/inbox); subscribes devices to push channels server side;
// reports presence; issues device tokens; disconnects devices; and manages
// groups (groups.go: groups and members in the store, each membership change
// told to every broker before the answer, see notifyGroup). See
// docs/api.md for users, and openapi.json (served at /openapi.json) for the
// contract that the tests hold the routes to.
//
// # Reaching brokers
//
// The push API joins the gossip cluster as a member with role "pushapi"
// and keeps one MQTT 5 connection, as client ID and username Config.Name
// with a service token as password, to the least-loaded alive broker of its
// gossip view (cluster.Pick). When that connection is lost, or gossip says
// its broker left or failed, it picks again, avoiding the broker it just
// lost, with backoff. A publish succeeds only once the broker acknowledged
// it (QoS 1 PUBACK, QoS 2 PUBCOMP, with a reason below 0x80) or, at QoS 0,
// once it was written to the connection; otherwise the request fails with
// 503 within Config.PublishTimeout, and at once when the connection drops.
//
// Brokers close a connection when its token expires (0xA0). Each connection
// gets a fresh service token, and the loop replaces the connection before
// that token expires: new sends wait, the messages in flight are
// acknowledged (amu counts them in mqttSession), then it disconnects
// normally and connects again, so a renewal fails no request.
//
// The connection is managed by a small loop around paho.Client rather than
// autopaho. autopaho v0.23.0 would let each (re)connection choose its broker
// (AttemptConnection, ConnectPacketBuilder), but its ConnectionManager only
// offers a blocking Publish: a batch could then be pipelined only from
// several goroutines, which puts its messages on the wire in any order. The
// paho.Client's PublishWithOptions(PublishMethod_AsyncSend) writes them in
// order without waiting, and a session wrapper (session.go) hands each
// acknowledgement, or the loss of the connection, to the request waiting
// for it.
//
// # Concurrency
//
// A PushAPI is created by New (validation only, no I/O), started by Start
// (returns once its HTTP listener is bound and gossip has started; it does
// not wait for a broker) and stopped by Shutdown (idempotent, bounded by
// its context; not to be called concurrently with Start). Its methods are
// safe for concurrent use. Every goroutine it starts is owned by the
// PushAPI and awaited by Shutdown.
//
// Locks: publisher.mu guards the connection fields (and the renewal gate)
// only and is never held while calling out. In mqttSession, mu (held for
// reading across paho's AddToSession) comes before wmu and amu; paho's own
// state lock is taken inside mu, never the other way round.
package pushapi
