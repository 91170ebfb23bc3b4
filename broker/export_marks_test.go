package broker

import (
	"time"

	"github.com/rtm-dev/rtm/broker/link"
)

// AdoptedMarks is the number of sessions on the node marked adopted from
// a failed node (cluster_failover.go).
func (b *Broker) AdoptedMarks() int { return int(b.cluster.adopted.n.Load()) }

// HoldPublishesFrom keeps the publishes peer from sends the node
// undelivered, so unacknowledged on the link, until release closes; they
// are then ignored (the node is meant to be dead by then).
func (b *Broker) HoldPublishesFrom(from string, release <-chan struct{}) {
	f := func(peer string, m link.Message) error {
		if peer == from && m.Type == msgPublish {
			<-release
			return errDropped
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}

// AdoptedMarkActive reports whether client id's session is marked
// adopted from node, and not only kept done for a later mark
// (cluster_failover.go).
func (b *Broker) AdoptedMarkActive(id, node string) bool {
	a := &b.cluster.adopted
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range a.by[id] {
		if m.from == node {
			return !m.done
		}
	}
	return false
}

// MovedMark is a mark a session carries in a move (moveStartMsg): the
// failed node, when the session was adopted from it, and whether every
// broker was done with its held link at the source.
type MovedMark struct {
	From string
	At   time.Time
	Done bool
}

// MoveInMarks marks client id's session as a move in carrying marks
// (oldest first) does.
func (b *Broker) MoveInMarks(id string, marks ...MovedMark) {
	var ms []earlierMark
	for _, m := range marks {
		ms = append(ms, earlierMark{From: m.From, At: m.At.UnixMilli(), Done: m.Done})
	}
	b.cluster.moveInMarks(id, ms)
}

// FailedPeerHold is the node's cluster.failed_peer_hold.
func (b *Broker) FailedPeerHold() time.Duration { return b.cluster.peers.hold }
