// Package link is the node link of an rtm broker cluster: a direct, ordered,
// authenticated TCP stream from one broker node to another that carries
// opaque application messages (route updates, forwarded publishes, retained
// updates, client-ID claims, session transfers). The caller encodes them; the
// link only moves Message{Type, Body}.
//
// # Two one-way links per pair
//
// Each node runs one Server and dials one Link per peer, so nodes A and B are
// joined by two TCP connections: A→B carries A's messages (and B's acks back),
// B→A carries B's. Keeping each direction on its own connection gives every
// stream exactly one writer of data and one sequence space, so ordering and
// recovery never depend on what the other direction is doing, and a node that
// restarts only has to re-dial, not be re-dialled.
//
// # Sequence numbers, acks and de-duplication
//
// TCP alone loses whatever sat in socket buffers when a connection breaks, and
// the broker must not lose a forwarded QoS 1/2 publish because a switch
// hiccupped. So every Send gets a sequence number and stays queued until the
// receiver acknowledges it cumulatively; after a reconnect the receiver's Ready
// frame says how far it got (with Config.BeforeAck, how far is safe), and the
// sender re-sends only what is missing.
// Re-sending alone would duplicate a message whose ack was lost, so the
// receiver also remembers, per sender, the last sequence number it delivered
// and skips anything older. The memory is keyed by the sender's incarnation (a
// random number picked at process start) and by a random stream ID per Link,
// because a restarted sender, or a process that closes and re-dials a peer,
// starts counting at 1 again. Within two processes that stay up, a reliable
// message is therefore delivered exactly once and in order. Across a receiver
// restart the guarantee weakens to at least once for messages that were
// delivered but not yet acknowledged (at most about 256 messages or 10 ms).
//
// # Settled: when the sender may answer for a message
//
// A caller that promises something about a message once the peer has it
// (the broker's PUBACK with durability) learns it from QueueSeq, which
// returns the message's sequence number, and Settled(seq): settled once
// the peer acknowledged it (with Config.BeforeAck, it is safe there), or
// it is no longer queued (discarded: Config.OnDiscard had it), or the Link
// is held (Hold: its queue is the owner's to hand on; what was queued up
// to or during a hold stays settled once it is resumed) or closed. Until
// then Settled returns a channel closed when that may have changed, so
// waiting costs no polling: one channel serves every waiter, and is made
// only while someone waits and closed by the next ack frame, discard,
// Hold(true) or Close. A Link nobody waits on pays nothing per ack. Once
// settled, Lost(seq) tells a message the Link threw away (Close, a peer
// that restarted) without an acknowledgement and outside a hold from one
// the peer acknowledged, however many later messages were acknowledged
// since (the Link keeps the last 64 discarded ranges): the caller must not
// answer for a lost one.
// Settled never waits for the network itself: a peer that is down and not
// given up keeps its messages unsettled until it reconnects and
// acknowledges them, or its owner holds or closes the Link. A caller that
// hands a held queue on and answers for a message only once its copy is
// safe elsewhere asks Fate(seq) instead: pending, acknowledged, held
// (queued before or during a hold and not acknowledged: the owner finds it
// by its Message.Seq in what Queued and Config.OnDiscard give, and follows
// it), or lost. A message a restarted peer's discard threw away stays lost
// once the new process acknowledges later ones.
//
// Unreliable messages (QoS 0, route deltas) are sent at most once: after a
// reconnect, those already written are dropped rather than re-sent, because
// a late QoS 0 publish is worse than a lost one and route state is resent
// whole anyway.
//
// # OnUp snapshots
//
// Deltas are only meaningful on top of the state they change, and a receiver
// that restarted has none. So on every (re)connect the Link first writes the
// messages returned by the caller's OnUp callback (a full route snapshot and a
// retained sync), unsequenced: they are neither de-duplicated nor acked nor
// re-sent, since the next connection brings a fresher snapshot. OnUp runs on
// the link's goroutine with no link lock held, because it takes the caller's
// locks and the caller calls Send while holding them. Messages queued before
// the snapshot and not yet written still follow it, so deltas should be
// idempotent against a snapshot that already contains them.
//
// # Heartbeat
//
// A peer that vanishes without a FIN or RST (a frozen VM, a dropped NAT entry)
// leaves a connection that looks open forever, while the queue grows behind
// it. The dialer therefore pings every Heartbeat when it has nothing to send,
// the acceptor answers every ping with an ack, and each side closes a
// connection on which it has heard nothing for three heartbeats. The dialer
// announces its heartbeat in the handshake, so the acceptor times out on the
// dialer's schedule even if their configurations differ.
//
// # Authentication
//
// Any process that can reach the port could otherwise inject publishes into
// the cluster, so both ends prove knowledge of the shared cluster secret with
// HMAC-SHA256 over fresh nonces from both sides and both node names, with a
// different label per direction so a proof cannot be reflected. The secret
// itself never crosses the wire. An empty secret still runs the handshake
// (an HMAC with an empty key), which authenticates nothing; the caller warns.
//
// # Encryption
//
// With Config.TLS set, every connection is wrapped in mutual TLS 1.3 before
// the first frame, and the handshake above runs inside it (see SecretTLS and
// FileTLS for the two trust models). TLS wraps the TCP connection under the
// buffered frame reader and writer; Close, Forget and a failing reader or
// writer still close the TCP connection itself, since closing the TLS one
// would first send a close alert, which can block on a peer that stopped
// reading.
//
// # Concurrency and locks
//
// Send, Queue, QueueSeq, Settled, Fate, Lost, WaitSettled, Stats,
// PeerIncarnation, ExpectIncarnation, Up and Close of a Link, and Stats, Incarnation, Forget
// and Close of a Server, are safe for concurrent use. Send never blocks on
// the network: it
// appends to the queue under the Link's mutex and wakes the writer. Link.mu
// and Server.mu are leaf locks: no other lock is taken while one is held, and
// neither OnUp nor Handler.Deliver is ever called with one held. OnUp must not
// call Close on its own Link, and Close must not be called while holding a
// lock that OnUp takes, since Close waits for OnUp to return.
//
// # Wire format
//
// Every frame is a 4-byte big-endian length, a frame type byte and a body (see
// FrameType and DecodeFrame). Frame types below 16 belong to the link;
// message types 16–255 belong to the application.
package link
