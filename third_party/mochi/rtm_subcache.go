// SPDX-License-Identifier: MIT
// rtm patch 104: the subscribers of a recently published topic are looked
// up, not matched again, while no subscription changes. See PATCHES.md.

package mqtt

import (
	"hash/maphash"
	"strings"
	"sync/atomic"
)

// subsCacheSlots is the number of topics whose subscribers are remembered
// (a direct-mapped table: a topic's slot is its hash's low bits). A power
// of two.
const subsCacheSlots = 1024

// subsCacheMaxFanout bounds the subscribers of a remembered result: a
// larger fan-out spends far more on its deliveries than on matching, and
// its map would stay in the table (a stale entry too, until its slot is
// reused). A variable for tests.
var subsCacheMaxFanout = 256

// subsCache remembers the result of matching a topic against the index
// (scanSubscribers), for topics published more than once while the
// subscriptions stay the same. Every change of the index's subscriptions
// (Subscribe, Unsubscribe, InlineSubscribe, InlineUnsubscribe) increments
// gen, which makes every entry stale at once. A hit takes no lock and
// writes nothing shared: a publish on one core does not disturb another's.
//
// Why: matching walks the topic's levels in the index (a map lookup and a
// read lock for each level's literal, '+' and '#' children) and copies
// every matching subscription into a map; for a low-rate message it is
// about a sixth of the broker's time from reading the PUBLISH to writing
// it to the subscriber, in memory the previous message left cold.
type subsCache struct {
	// gen is here, not in the table, so that a change before the table is
	// made is still ordered before every entry the table will hold.
	gen atomic.Uint64
	// table is made by the first lookup: rtm makes indexes that are never
	// published to (a session-move relay's, a cluster's routes), and the
	// table is 16 KiB.
	table atomic.Pointer[subsCacheTable]
}

type subsCacheTable struct {
	slots [subsCacheSlots]atomic.Pointer[subsCacheEntry]
	// cand[i] is candKey of the last topic that missed slot i, and the
	// generation it missed in: a topic is remembered at its second miss in
	// a row there within one generation, so topics published once (a
	// device's own topic among thousands) do not each allocate an entry and
	// a result the pool would otherwise reuse, nor does a hot topic at
	// every publish while the subscriptions keep changing.
	cand [subsCacheSlots]atomic.Uint64
}

// subsCacheSeed: one for all indexes (a TopicsIndex may be made as a literal).
var subsCacheSeed = maphash.MakeSeed()

// subsCacheEntry is an immutable result: subs is never changed nor given
// back to the pool once the entry is made.
type subsCacheEntry struct {
	topic string
	gen   uint64
	subs  *Subscribers
}

// invalidate makes every entry stale; called with the index locked, after
// a change of its subscriptions.
func (c *subsCache) invalidate() { c.gen.Add(1) }

// candKey mixes a topic's hash with a generation; a collision only makes a
// topic remembered at its first miss.
func candKey(h, gen uint64) uint64 { return h ^ gen*0x9e3779b97f4a7c15 }

// cachedSubscribers returns the subscribers of topic, and whether the
// result is the cache's (shared, read-only: not to be changed nor released
// with releaseSubscribers) or a pooled one the caller releases. A result
// with shared subscriptions is never cached: the caller selects among them
// in the result itself. rtm patch 104.
func (x *TopicsIndex) cachedSubscribers(topic string) (subs *Subscribers, cached bool) {
	c := &x.subsCache
	gen := c.gen.Load() // before the scan: a change during it makes the new entry stale
	t := c.table.Load()
	if t == nil {
		t = new(subsCacheTable)
		if !c.table.CompareAndSwap(nil, t) {
			t = c.table.Load()
		}
	}
	h := maphash.String(subsCacheSeed, topic)
	i := h & (subsCacheSlots - 1)
	if e := t.slots[i].Load(); e != nil && e.gen == gen && e.topic == topic {
		return e.subs, true
	}
	if k := candKey(h, gen); t.cand[i].Load() != k {
		t.cand[i].Store(k)
		return x.pooledSubscribers(topic), false
	}
	subs = x.scanSubscribers(topic, 0, nil, &Subscribers{})
	if len(subs.Shared) > 0 || len(subs.Subscriptions) > subsCacheMaxFanout || c.gen.Load() != gen {
		// Not remembered: the caller's releaseSubscribers pools it.
		return subs, false
	}
	// The topic is cloned: pk.TopicName points into the buffer the whole
	// PUBLISH was read into (patch 76), which the entry would keep alive.
	t.slots[i].Store(&subsCacheEntry{topic: strings.Clone(topic), gen: gen, subs: subs})
	return subs, true
}
