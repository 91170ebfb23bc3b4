package broker

import "github.com/rtm-dev/rtm/broker/link"

// SetTestNoSync stops (true) or resumes the node's links following
// gossip (syncPeers), as a watch goroutine that has not handled gossip's
// event yet.
func (b *Broker) SetTestNoSync(on bool) { b.cluster.testNoSync.Store(on) }

// HoldPublishes holds back the node's handling of the publishes from peer
// from (and so of everything that peer sends after one) until release
// closes, as a congested link would.
func (b *Broker) HoldPublishes(from string, release <-chan struct{}) {
	f := func(peer string, m link.Message) error {
		if peer == from && m.Type == msgPublish {
			<-release
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}
