// SPDX-License-Identifier: MIT
// rtm patch 104: the subscribers of a recently published topic are looked
// up, not matched again, while no subscription changes. See PATCHES.md.

package mqtt

import (
	"hash/maphash"
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
// gen, which makes every entry stale at once. Reads take no lock and write
// nothing shared: a publish on one core does not disturb another's.
//
// Why: matching walks the topic's levels in the index (a map lookup and a
// read lock for each level's literal, '+' and '#' children) and copies
// every matching subscription into a map; for a low-rate message it is
// about a sixth of the broker's time from reading the PUBLISH to writing
// it to the subscriber, in memory the previous message left cold.
type subsCache struct {
	gen   atomic.Uint64
	slots [subsCacheSlots]atomic.Pointer[subsCacheEntry]
	// cand[i] is the hash of the last topic that missed slot i: a topic is
	// remembered at its second miss in a row there, so topics published
	// once (a device's own topic among thousands) do not each allocate an
	// entry and a result the pool would otherwise reuse.
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

// cachedSubscribers returns the subscribers of topic, and whether the
// result is the cache's (shared, read-only: not to be changed nor released
// with releaseSubscribers) or a pooled one the caller releases. A result
// with shared subscriptions is never cached: the caller selects among them
// in the result itself. rtm patch 104.
func (x *TopicsIndex) cachedSubscribers(topic string) (subs *Subscribers, cached bool) {
	c := &x.subsCache
	gen := c.gen.Load() // before the scan: a change during it makes the new entry stale
	h := maphash.String(subsCacheSeed, topic)
	i := h & (subsCacheSlots - 1)
	if e := c.slots[i].Load(); e != nil && e.gen == gen && e.topic == topic {
		return e.subs, true
	}
	if c.cand[i].Load() != h {
		c.cand[i].Store(h)
		return x.pooledSubscribers(topic), false
	}
	subs = x.scanSubscribers(topic, 0, nil, &Subscribers{})
	if len(subs.Shared) > 0 || len(subs.Subscriptions) > subsCacheMaxFanout {
		return subs, false // not pooled: releaseSubscribers pools it, harmless
	}
	c.slots[i].Store(&subsCacheEntry{topic: topic, gen: gen, subs: subs})
	return subs, true
}
