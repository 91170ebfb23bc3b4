// SPDX-License-Identifier: MIT
// rtm patch 104: the subscribers of a topic published again are not
// matched again while the subscriptions stay the same.

package mqtt

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/packets"
)

// A topic published again does not walk the index: with the matched
// particle's subscriptions write-locked (as a SUBSCRIBE changing them holds
// it), publishing the topic a third time still returns. Without the patch
// every publish read-locks the particle, so the third blocked until the
// test unlocked it.
func TestPublishAgainSkipsIndex(t *testing.T) {
	s := New(&Options{Logger: logger})
	s.Topics.Subscribe("a", packets.Subscription{Filter: "t/1"})
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "t/1", Payload: []byte("x")}
	s.publishToSubscribers(pk)
	s.publishToSubscribers(pk) // the second in a row is remembered

	p := s.Topics.seek("t/1", 0)
	require.NotNil(t, p)
	p.subscriptions.Lock()
	done := make(chan struct{})
	go func() {
		s.publishToSubscribers(pk)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		p.subscriptions.Unlock()
		<-done
		t.Fatal("the publish matched the topic against the index again")
	}
	p.subscriptions.Unlock()
}

// Every change of the subscriptions is seen by the next lookup, also when
// the topic's result was remembered, and a remembered result is the same
// for every lookup until then.
func TestSubscribersCacheFollowsChanges(t *testing.T) {
	x := NewTopicsIndex()
	look := x.cachedSubscribers // results not released: left to the GC
	ids := func(topic string) []string {
		subs, _ := look(topic)
		var out []string
		for id := range subs.Subscriptions {
			out = append(out, id)
		}
		for id := range subs.InlineSubscriptions {
			out = append(out, fmt.Sprint("inline", id))
		}
		return out
	}

	x.Subscribe("a", packets.Subscription{Filter: "t/+", Qos: 1})
	first, cached := look("t/1")
	require.False(t, cached, "a topic's first miss is not remembered")
	require.Contains(t, first.Subscriptions, "a")
	second, cached := look("t/1")
	require.True(t, cached, "its second is")
	third, cached := look("t/1")
	require.True(t, cached)
	require.Same(t, second, third, "and looked up, not matched again")
	require.Equal(t, byte(1), third.Subscriptions["a"].Qos)

	x.Subscribe("b", packets.Subscription{Filter: "t/1"})
	require.ElementsMatch(t, []string{"a", "b"}, ids("t/1"))
	require.ElementsMatch(t, []string{"a", "b"}, ids("t/1"))
	x.Subscribe("a", packets.Subscription{Filter: "t/+", Qos: 2}) // changed, not added
	look("t/1")
	subs, cached := look("t/1")
	require.True(t, cached)
	require.Equal(t, byte(2), subs.Subscriptions["a"].Qos)
	x.Unsubscribe("t/+", "a")
	require.ElementsMatch(t, []string{"b"}, ids("t/1"))
	x.InlineSubscribe(InlineSubscription{Subscription: packets.Subscription{Filter: "t/#", Identifier: 7}, Handler: func(*Client, packets.Subscription, packets.Packet) {}})
	require.ElementsMatch(t, []string{"b", "inline7"}, ids("t/1"))
	x.InlineUnsubscribe(7, "t/#")
	require.ElementsMatch(t, []string{"b"}, ids("t/1"))
	x.Unsubscribe("t/1", "b")
	require.Empty(t, ids("t/1"))
	require.Empty(t, ids("t/1"))

	// A shared subscription's result is never remembered: the publish
	// selects among its members in the result itself.
	x.Subscribe("c", packets.Subscription{Filter: "$share/g/t/1"})
	for i := 0; i < 3; i++ {
		subs, cached := look("t/1")
		require.False(t, cached)
		require.Len(t, subs.Shared, 1)
	}
	// Nor a large fan-out's.
	defer func(n int) { subsCacheMaxFanout = n }(subsCacheMaxFanout)
	subsCacheMaxFanout = 2
	for _, id := range []string{"f1", "f2", "f3"} {
		x.Subscribe(id, packets.Subscription{Filter: "f/1"})
	}
	for i := 0; i < 3; i++ {
		subs, cached := look("f/1")
		require.False(t, cached)
		require.Len(t, subs.Subscriptions, 3)
	}
	// '+' still does not match a $ topic [MQTT-4.7.1-2].
	x.Subscribe("d", packets.Subscription{Filter: "+/x"})
	require.Empty(t, ids("$SYS/x"))
	require.Empty(t, ids("$SYS/x"))
}

// A lookup made after a change returned sees it, while other goroutines
// keep remembering results computed beside the changes (run with -race).
func TestSubscribersCacheConcurrentChanges(t *testing.T) {
	x := NewTopicsIndex()
	x.Subscribe("keep", packets.Subscription{Filter: "r/1"})
	var stop atomic.Bool
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				subs, cached := x.cachedSubscribers("r/1")
				if !cached {
					releaseSubscribers(subs)
				}
			}
		}()
	}
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()
	has := func(id string) bool {
		subs, cached := x.cachedSubscribers("r/1")
		_, ok := subs.Subscriptions[id]
		if !cached {
			releaseSubscribers(subs)
		}
		return ok
	}
	for i := 0; i < 2000; i++ {
		x.Subscribe("x", packets.Subscription{Filter: "r/#"})
		require.True(t, has("x"), "round %d: subscribed", i)
		require.True(t, has("keep"))
		x.Unsubscribe("r/#", "x")
		require.False(t, has("x"), "round %d: unsubscribed", i)
	}
}
