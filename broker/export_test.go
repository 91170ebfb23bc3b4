package broker

import "github.com/rtm-dev/rtm/internal/cluster"

// SetTestMembers makes the node's link management see the gossip member
// list as f rewrites it (nil: as it is), so a test can make a peer look
// failed, or alive, without stopping it. Gossip itself is unchanged.
func (b *Broker) SetTestMembers(f func([]cluster.Member) []cluster.Member) {
	if f == nil {
		b.cluster.testMembers.Store(nil)
		return
	}
	b.cluster.testMembers.Store(&f)
}
