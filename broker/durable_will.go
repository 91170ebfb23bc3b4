package broker

import (
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// durableWillHook stores the will of a client without a persistent
// session before its CONNACK: should the node die right after, a survivor
// finds the will in the store and publishes it (see durableHook.claim).
// Before, the record was queued after the CONNACK and written within the
// writer's window: a node that died in it took the will along.
//
// A hook of its own, added after the cluster's: that one may refuse the
// CONNECT (its session is moving), and a will stored for a client that
// never connected would be published by a survivor.
//
// The CONNACK waits for the writer's group commit (typically 50–100 ms),
// like a persistent session's SUBACK; a client with a persistent session
// is written after its CONNACK, with its session (its subscriptions are
// not inherited yet here).
type durableWillHook struct {
	mqtt.HookBase
	d *durableHook
}

func (h *durableWillHook) ID() string { return "rtm-durable-will" }

func (h *durableWillHook) Provides(b byte) bool { return b == mqtt.OnSessionEstablish }

func (h *durableWillHook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	h.d.storeWill(cl)
}

// willOnly reports whether cl is stored for its will alone.
func willOnly(cl *mqtt.Client) bool {
	return !cl.Net.Inline && !persistent(cl) && atomic.LoadUint32(&cl.Properties.Will.Flag) == 1
}

// storeWill writes the will record of a client without a persistent
// session and waits for its commit (at most durableSubscribeMax). Should
// the store not commit it in time, the CONNECT goes on (the write stays
// queued, and lands once the store answers) and it is counted in
// will_unstored: refusing every client with a will while the store is slow
// would take a whole fleet offline for a node death that may not come.
func (d *durableHook) storeWill(cl *mqtt.Client) {
	if cl.SessionRefused() || !willOnly(cl) { // rtm patch 34
		return
	}
	var refused atomic.Bool
	t, err := d.writeSessionRefused(cl, true, &refused)
	if err == nil {
		err = d.waitSession(t, &refused)
	}
	if err != nil {
		d.willUnstored.Add(1)
		d.log.Warn("client connected before its will was stored: a node death now loses the will", "client_id", cl.ID, "error", err)
	}
}
