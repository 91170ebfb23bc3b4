// SPDX-License-Identifier: MIT
// rtm patch 104: the subscribers of a topic published again are not
// matched again while the subscriptions stay the same.

package mqtt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"runtime"
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

// decodePublishBody builds a PUBLISH body as readBody returns it (a buffer
// of its own per packet) and decodes it as ReadPacket does.
func decodePublishBody(t testing.TB, topic string, payload int) packets.Packet {
	body := make([]byte, 2+len(topic)+payload)
	binary.BigEndian.PutUint16(body, uint16(len(topic)))
	copy(body[2:], topic)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 4}
	require.NoError(t, pk.PublishDecode(body))
	return pk
}

// liveHeap is the heap in use after the garbage is collected.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// A remembered result does not keep the PUBLISH that stored it: the topic
// decoded from a packet points into the buffer holding the whole packet
// (patch 76). Without the copy, 512 topics published twice with 64 KiB
// payloads stayed in memory (32 MiB) after their delivery.
func TestSubscribersCacheDoesNotPinPackets(t *testing.T) {
	s := New(&Options{Logger: logger})
	const topics, payload = 512, 64 << 10
	before := liveHeap()
	for i := 0; i < topics; i++ {
		topic := fmt.Sprintf("dev/%d/telemetry", i)
		for j := 0; j < 2; j++ { // the second publish in a row is remembered
			s.publishToSubscribers(decodePublishBody(t, topic, payload))
		}
	}
	after := liveHeap()
	_, cached := s.Topics.cachedSubscribers("dev/511/telemetry")
	require.True(t, cached, "the topics were remembered")
	runtime.KeepAlive(s)
	require.Less(t, int64(after)-int64(before), int64(8<<20), "published messages stay in memory after their delivery")
}

// The same through a client's read path (ReadFixedHeader, ReadPacket):
// 10 topics published twice with 512 KiB payloads kept 4.7 MB.
func TestSubscribersCacheDoesNotPinReadPackets(t *testing.T) {
	s := New(&Options{Logger: logger})
	cl, r, _ := newTestClient()
	cl.Properties.ProtocolVersion = 4
	const topics, payload = 10, 512 << 10
	go func() {
		for i := 0; i < topics; i++ {
			for j := 0; j < 2; j++ {
				pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 4,
					TopicName: fmt.Sprintf("dev/%d/telemetry", i), Payload: make([]byte, payload)}
				var b bytes.Buffer
				_ = pk.PublishEncode(&b)
				_, _ = r.Write(b.Bytes())
			}
		}
	}()
	before := liveHeap()
	for i := 0; i < 2*topics; i++ {
		var fh packets.FixedHeader
		require.NoError(t, cl.ReadFixedHeader(&fh))
		pk, err := cl.ReadPacket(&fh)
		require.NoError(t, err)
		s.publishToSubscribers(pk)
	}
	after := liveHeap()
	runtime.KeepAlive(s)
	require.Less(t, int64(after)-int64(before), int64(2<<20), "published messages stay in memory after their delivery")
}

// While the subscriptions keep changing (another client's, of another
// topic), publishing a topic costs what the pooled result of patch 84 costs,
// not a new result and entry each time; and a change that changes nothing
// (unsubscribing an absent subscription) keeps the remembered results.
func TestSubscribersCacheUnderChurn(t *testing.T) {
	x := NewTopicsIndex()
	for i := 0; i < 10; i++ {
		x.Subscribe(fmt.Sprint("s", i), packets.Subscription{Filter: "t/1", Qos: 1})
	}
	look := func() {
		if subs, cached := x.cachedSubscribers("t/1"); !cached {
			releaseSubscribers(subs)
		}
	}
	look()
	look()
	filters := []string{"u/0", "u/1"}
	n := 0
	churn := testing.AllocsPerRun(200, func() {
		n++
		x.Subscribe("other", packets.Subscription{Filter: filters[n%2]})
		look()
	})
	pooled := testing.AllocsPerRun(200, func() {
		n++
		x.Subscribe("other", packets.Subscription{Filter: filters[n%2]})
		releaseSubscribers(x.pooledSubscribers("t/1"))
	})
	t.Logf("allocations per change and publish: cached %v, pooled %v", churn, pooled)
	require.LessOrEqual(t, churn, pooled+0.5, "allocations per change and publish: cached %v, pooled %v", churn, pooled)

	look()
	first, cached := x.cachedSubscribers("t/1")
	require.True(t, cached)
	x.Unsubscribe("t/1", "absent")
	x.Unsubscribe("never/subscribed", "s1")
	x.Unsubscribe("$share/g/t/1", "s1")
	x.InlineUnsubscribe(99, "t/1")
	again, cached := x.cachedSubscribers("t/1")
	require.True(t, cached, "a change of nothing made the results stale")
	require.Same(t, first, again)
}

// An index never looked up through the cache (rtm makes one per session
// move and for a cluster's routes) does not carry the cache's 16 KiB table.
func TestSubscribersCacheTableMadeByFirstLookup(t *testing.T) {
	const n = 64
	xs := make([]*TopicsIndex, n)
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := range xs {
		xs[i] = NewTopicsIndex()
		xs[i].Subscribe("a", packets.Subscription{Filter: "t/1"})
		xs[i].Unsubscribe("t/1", "a")
		_ = xs[i].Subscribers("t/1")
	}
	runtime.ReadMemStats(&m1)
	per := (m1.TotalAlloc - m0.TotalAlloc) / n
	require.Less(t, per, uint64(8<<10), "bytes allocated per index")
	runtime.KeepAlive(xs)

	// A literal index, as a zero subsCache, works alike.
	x := &TopicsIndex{Retained: packets.NewPackets(), root: &particle{particles: newParticles(), subscriptions: NewSubscriptions()}}
	x.Subscribe("a", packets.Subscription{Filter: "t/1"})
	for i := 0; i < 3; i++ {
		subs, _ := x.cachedSubscribers("t/1")
		require.Contains(t, subs.Subscriptions, "a")
	}
}

// splitPublishes splits a stream of packets written to a client into
// its PUBLISHes.
func splitPublishes(t *testing.T, buf []byte) []packets.Packet {
	var out []packets.Packet
	for len(buf) > 0 {
		fh := packets.FixedHeader{}
		require.NoError(t, fh.Decode(buf[0]))
		rem, mul, i := 0, 1, 1
		for ; ; i++ {
			rem += int(buf[i]&127) * mul
			mul *= 128
			if buf[i] < 128 {
				break
			}
		}
		fh.Remaining = rem
		body := buf[i+1 : i+1+rem]
		buf = buf[i+1+rem:]
		pk := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
		require.NoError(t, pk.PublishDecode(body))
		out = append(out, pk)
	}
	return out
}

// Through publishToSubscribers and real deliveries: a remembered result
// delivers with the subscriptions' current options (identifiers, QoS),
// and not after UNSUBSCRIBE; and it outlives the pool's churn (a
// remembered result released to the pool would be cleared, later
// publishes delivering to no one).
func TestPublishCachedFollowsChanges(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.TopicAliasMaximum = 0
	cl.State.Inflight.ResetSendQuota(100) // the QoS 1 deliveries are not acknowledged
	s.Clients.Add(cl)
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/b/+", Identifier: 2})
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/#", Identifier: 3})
	got := make(chan []byte)
	go func() {
		buf, _ := io.ReadAll(r)
		got <- buf
	}()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b/c", Payload: []byte("x")}
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				s.publishToSubscribers(pk)
				releaseSubscribers(s.Topics.pooledSubscribers("a/b/c")) // churns the pool
				waitOutboundDrained(cl)
			}
		}()
	}
	wg.Wait()
	_, cached := s.Topics.cachedSubscribers("a/b/c")
	require.True(t, cached)
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/#", Identifier: 4, Qos: 1}) // options changed
	for i := 0; i < 3; i++ {
		s.publishToSubscribers(pk)
	}
	s.Topics.Unsubscribe("a/b/+", cl.ID)
	for i := 0; i < 3; i++ {
		s.publishToSubscribers(pk)
	}
	s.Topics.Unsubscribe("a/#", cl.ID)
	for i := 0; i < 3; i++ {
		s.publishToSubscribers(pk)
	}
	waitOutboundDrained(cl)
	_ = w.Close()
	pks := splitPublishes(t, <-got)
	require.Len(t, pks, 66)
	for i, p := range pks[:60] {
		require.ElementsMatch(t, []int{2, 3}, p.Properties.SubscriptionIdentifier, "delivery %d", i)
		require.Equal(t, byte(0), p.FixedHeader.Qos, "delivery %d", i)
	}
	for i, p := range pks[60:63] {
		require.ElementsMatch(t, []int{2, 4}, p.Properties.SubscriptionIdentifier, "delivery %d after the change", i)
		require.Equal(t, byte(1), p.FixedHeader.Qos, "delivery %d after the change", i)
	}
	for i, p := range pks[63:] {
		require.Equal(t, []int{4}, p.Properties.SubscriptionIdentifier, "delivery %d after the unsubscribe", i)
	}
}

// Several writers at once (shared subscriptions and identifiers among
// them), each checking its own change right after it returns, beside
// lookups filling the cache (-race).
func TestSubscribersCacheConcurrentWriters(t *testing.T) {
	x := NewTopicsIndex()
	var stop atomic.Bool
	var fill sync.WaitGroup
	for g := 0; g < 2; g++ {
		fill.Add(1)
		go func() {
			defer fill.Done()
			for !stop.Load() {
				if subs, cached := x.cachedSubscribers("r/1/2"); !cached {
					releaseSubscribers(subs)
				}
			}
		}()
	}
	filters := []string{"r/#", "r/+/2", "r/1/2", "+/1/#", "$share/g/r/1/2"}
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			id := fmt.Sprint("c", w)
			for i := 0; i < 500; i++ {
				f := filters[(i+w)%len(filters)]
				q := byte(i % 3)
				x.Subscribe(id, packets.Subscription{Filter: f, Qos: q, Identifier: i + 1})
				subs, cached := x.cachedSubscribers("r/1/2")
				var ok bool
				if f == "$share/g/r/1/2" {
					_, ok = subs.Shared[f][id]
				} else {
					var sub packets.Subscription
					sub, ok = subs.Subscriptions[id]
					if ok && (sub.Qos != q || sub.Identifier != i+1) {
						errs <- fmt.Sprintf("%s round %d: stale options %+v", id, i, sub)
					}
				}
				if !cached {
					releaseSubscribers(subs)
				}
				if !ok {
					errs <- fmt.Sprintf("%s round %d: missing after subscribe %s", id, i, f)
					return
				}
				x.Unsubscribe(f, id)
				subs, cached = x.cachedSubscribers("r/1/2")
				_, ok = subs.Subscriptions[id]
				_, shared := subs.Shared["$share/g/r/1/2"][id]
				if !cached {
					releaseSubscribers(subs)
				}
				if ok || shared {
					errs <- fmt.Sprintf("%s round %d: present after unsubscribe %s", id, i, f)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	stop.Store(true)
	fill.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
