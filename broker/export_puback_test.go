package broker

import (
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// ClusterPublishAllocs is the allocations of the cluster hook's OnPublish
// and OnPublishHold for one QoS qos PUBLISH on topic by the connected
// client id (a publish no peer subscribes to, in the allocation test).
func (b *Broker) ClusterPublishAllocs(id, topic string, qos byte) float64 {
	cl, ok := b.mq.Clients.Get(id)
	if !ok {
		return -1
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic, Payload: []byte("x"), Origin: id}
	return testing.AllocsPerRun(200, func() {
		if _, err := b.cluster.OnPublish(cl, pk); err != nil {
			panic(err)
		}
		if w := b.cluster.OnPublishHold(cl, pk); w != nil {
			_ = w()
		}
	})
}

// SetPeerAckWait shortens how long a publisher's acknowledgement waits
// for a peer that neither acknowledges nor fails (peerAckWaitDefault).
func (b *Broker) SetPeerAckWait(d time.Duration) { b.cluster.peerAckWait.Store(int64(d)) }
