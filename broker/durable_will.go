package broker

import (
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// durableWillHook stores the will of every client that has one before its
// CONNACK: should the node die right after, a survivor finds the will in
// the store and publishes it (see durableHook.claim, restore). Before, the
// record was queued after the CONNACK and written within the writer's
// window: a node that died in it took the will along.
//
// A client without a persistent session gets a record of its own (will
// only). A client with a persistent session gets its session document,
// with the subscriptions it is about to inherit: mochi inherits them only
// after this hook, and a document written without them would hand an
// adopter a session that lost its subscriptions. The document is written
// again after the CONNACK (OnSessionEstablished), with what was inherited.
//
// A hook of its own, added after the cluster's: that one may refuse the
// CONNECT (its session is moving), and a will stored for a client that
// never connected would be published by a survivor. And after the cluster
// hook moved the session here, so the subscriptions read are the moved
// session's, and the take-over of its stored document is queued ahead.
//
// The CONNACK waits for the write's commit, which skips the writer's
// coalescing delay (writebehind PutNow): one store round trip, shared by
// the CONNECTs of a storm (group commit).
type durableWillHook struct {
	mqtt.HookBase
	d *durableHook
}

func (h *durableWillHook) ID() string { return "rtm-durable-will" }

func (h *durableWillHook) Provides(b byte) bool { return b == mqtt.OnSessionEstablish }

func (h *durableWillHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.d.storeWill(cl, pk)
}

// willOnly reports whether cl is stored for its will alone.
func willOnly(cl *mqtt.Client) bool {
	return !cl.Net.Inline && !persistent(cl) && atomic.LoadUint32(&cl.Properties.Will.Flag) == 1
}

// storeWill writes the will of cl, connecting with pk, and waits for its
// commit (at most durableSubscribeMax). Should the store not commit it in
// time, the CONNECT goes on (the write stays queued, and lands once the
// store answers) and it is counted in will_unstored: refusing every client
// with a will while the store is slow would take a whole fleet offline for
// a node death that may not come.
func (d *durableHook) storeWill(cl *mqtt.Client, pk packets.Packet) {
	if cl.SessionRefused() { // rtm patch 34
		// No OnSessionEstablished nor OnDisconnect follows.
		d.mu.Lock()
		s := d.notEstablishedLocked(cl)
		d.mu.Unlock()
		d.replaySkipped(s)
		return
	}
	if cl.Net.Inline || atomic.LoadUint32(&cl.Properties.Will.Flag) != 1 {
		return
	}
	var subs map[string]packets.Subscription
	// existed: cl resumes a session here (a clean start resumes none,
	// even if one is still here: its document is written once, as a new
	// session's).
	_, existed := d.b.mq.Clients.Get(cl.ID)
	existed = existed && !pk.Connect.Clean
	if persistent(cl) {
		subs = d.inherited(cl, pk)
	}
	var refused atomic.Bool
	t, err := d.queueSession(cl, subs, true, &refused, true)
	queued := err == nil
	if queued {
		err = d.waitSession(t, &refused)
	}
	if queued && !refused.Load() && persistent(cl) && !existed {
		// A new session, written (or queued, to land once the store
		// answers): OnSessionEstablished need not write the same again.
		// A session here before is written again after the CONNACK: a
		// connection it takes over may write its own document (without
		// the will it just published) in between.
		if subs == nil {
			subs = map[string]packets.Subscription{}
		}
		d.mu.Lock()
		d.preWritten[cl] = subs
		d.mu.Unlock()
	}
	if err != nil {
		d.willUnstored.Add(1)
		d.log.Warn("client connected before its will was stored: a node death now loses the will", "client_id", cl.ID, "error", err)
	}
}

// inherited returns the subscriptions cl's session will hold once mochi
// inherits it (inheritClientSession decides the same way): those of the
// session here under its ID, unless either starts clean.
func (d *durableHook) inherited(cl *mqtt.Client, pk packets.Packet) map[string]packets.Subscription {
	if pk.Connect.Clean {
		return nil
	}
	old, ok := d.b.mq.Clients.Get(cl.ID)
	if !ok || (old.Properties.Clean && old.Properties.ProtocolVersion < 5) {
		return nil
	}
	return old.State.Subscriptions.GetAll()
}
