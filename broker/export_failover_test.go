package broker

import (
	"errors"
	"sync"

	"github.com/rtm-dev/rtm/broker/link"
)

// MovesOut is the number of session moves out of this node under way.
func (b *Broker) MovesOut() int {
	out, _ := b.cluster.moves.count()
	return out
}

// DropClaims makes the node ignore the next n client-ID claims it
// receives, as a node that does not answer would.
func (b *Broker) DropClaims(n int) {
	var mu sync.Mutex
	f := func(_ string, m link.Message) error {
		if m.Type != msgClaim {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		if n > 0 {
			n--
			return errDropped
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}

var errDropped = errors.New("dropped by the test")

// SetTestBeforeClaims calls f when a CONNECT is about to send its claims
// to the peers; nil removes it.
func (b *Broker) SetTestBeforeClaims(f func(id string)) {
	if f == nil {
		b.cluster.testBeforeClaims.Store(nil)
		return
	}
	b.cluster.testBeforeClaims.Store(&f)
}
