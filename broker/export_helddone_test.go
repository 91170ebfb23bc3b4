package broker

import (
	"sync"

	"github.com/rtm-dev/rtm/broker/link"
)

// SetTestBeforeSync calls f each time the node's links begin to follow
// membership (syncPeers), on its watch loop; nil removes it.
func (b *Broker) SetTestBeforeSync(f func()) {
	if f == nil {
		b.cluster.testBeforeSync.Store(nil)
		return
	}
	b.cluster.testBeforeSync.Store(&f)
}

// HoldPublishFrom holds back the first publish from peer with payload
// (and, behind it, everything else from peer) until release is closed,
// closing arrived when it comes, as a slow link would.
func (b *Broker) HoldPublishFrom(peer, payload string, arrived chan<- struct{}, release <-chan struct{}) {
	var once sync.Once
	f := func(from string, m link.Message) error {
		if from != peer || m.Type != msgPublish {
			return nil
		}
		if pm, err := decodePublish(m.Body); err == nil && string(pm.Packet.Payload) == payload {
			once.Do(func() {
				close(arrived)
				<-release
			})
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}
