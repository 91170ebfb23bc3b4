// rtm patch 131: an MQTT 3.1.1 (or 3.1) client at the server's receive
// quota waits for a held acknowledgement instead of being disconnected.
// See PATCHES.md.

package mqtt

import (
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// receiveQuotaWait bounds how long the read loop of an MQTT 3.1.1 client
// at receive quota 0 waits for a held acknowledgement to give a unit back
// (awaitReceiveQuota); the client is then disconnected, as v2.7.9 did at
// once. A hold lasts at most a peer's failure detection plus the failover
// hand-over (about 20 s in rtm). A variable for the tests.
var receiveQuotaWait = 60 * time.Second

// awaitReceiveQuota is called by processPublish for a QoS 1/2 PUBLISH of a
// client whose receive quota is 0. An MQTT 5 client was told the Receive
// Maximum in its CONNACK, so exceeding it is a protocol error: it reports
// false (disconnect, 0x93 [MQTT-3.3.4-8]). An MQTT 3.1.1 client has no
// Receive Maximum and cannot know the limit: if held QoS 1
// acknowledgements (OnPublishHold, rtm patch 54) will each give a unit
// back, the read loop waits for one (the client's further packets wait in
// the socket: TCP backpressure) and it reports true once the quota is
// above 0. It reports false, and the client is disconnected as before, when
// no unit will come back without reading (the quota is taken by QoS 2
// flows, which give theirs back at the client's PUBREL, behind this
// PUBLISH in the stream), after receiveQuotaWait, or when the client is
// stopped (taken over, kicked, a hold failed) or the server closes.
//
// The releasing side is releaseAcks: it gives the unit back, then counts
// the held QoS 1 acknowledgement done, then wakes a waiter; the waiter
// registers, then reads that count, then the quota, so one of them sees the
// other and no wake-up is lost. No lock is held by either while waiting;
// releaseAcks takes h.mu only to close the wake channel.
// rtm patch 131.
//
//go:noinline
func (s *Server) awaitReceiveQuota(cl *Client) bool {
	if cl.Properties.ProtocolVersion >= 5 || cl.Net.Inline {
		return false
	}
	h := &cl.State.acks
	cl.FlushHeld() // rtm patch 70: the acknowledgements the read loop holds back go out before it blocks
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
		h.mu.Lock()
		h.quotaWake = nil
		h.mu.Unlock()
	}()
	for {
		h.mu.Lock()
		wake := make(chan struct{})
		h.quotaWake = wake
		h.mu.Unlock()
		pending := h.qos1.Load() // before the quota: see above
		if atomic.LoadInt32(&cl.State.Inflight.receiveQuota) > 0 {
			return true
		}
		if pending == 0 || cl.Closed() {
			return false
		}
		if timer == nil {
			s.Flow.QuotaWaits.Add(1)
			timer = time.NewTimer(receiveQuotaWait)
		}
		select {
		case <-wake:
		case <-timer.C:
			s.Log.Warn("client disconnected: receive maximum exceeded while its acknowledgements were held",
				"client", cl.ID, "waited", receiveQuotaWait)
			return false
		case <-cl.State.open.Done():
			return false
		case <-s.done:
			cl.Stop(packets.ErrServerShuttingDown) // the cause Close gives it, not "receive maximum exceeded"
			return false
		}
	}
}

// quotaReturned wakes a read loop waiting in awaitReceiveQuota, if any.
// Called by releaseAcks after a held QoS 1 acknowledgement gave its unit
// of receive quota back. rtm patch 131.
func (h *heldAcks) quotaReturned() {
	h.qos1.Add(-1)
	h.mu.Lock()
	if h.quotaWake != nil {
		close(h.quotaWake)
		h.quotaWake = nil
	}
	h.mu.Unlock()
}
