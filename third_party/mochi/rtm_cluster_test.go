// SPDX-License-Identifier: MIT
// rtm patch 17: tests of the cluster entry points, see PATCHES.md.

package mqtt

import (
	"fmt"
	"io"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

func TestTopicsIndexOnRouteCountsSubscribers(t *testing.T) {
	x := NewTopicsIndex()
	var events []string
	x.OnRoute = func(filter string, added bool) { events = append(events, fmt.Sprintf("%s %t", filter, added)) }

	x.Subscribe("c1", packets.Subscription{Filter: "a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "a/+"})
	x.Subscribe("c1", packets.Subscription{Filter: "a/+", Qos: 1}) // a change, not a new route
	x.Subscribe("c1", packets.Subscription{Filter: "$SHARE/g/a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "$share/g/a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "$share/h/a/+"})
	require.Equal(t, []string{"a/+ true", "$share/g/a/+ true", "$share/h/a/+ true"}, events)

	events = nil
	x.Unsubscribe("a/+", "c3") // never subscribed
	x.Unsubscribe("a/+", "c1")
	x.Unsubscribe("$share/g/a/+", "c1")
	require.Empty(t, events)
	x.Unsubscribe("a/+", "c2")
	x.Unsubscribe("$share/g/a/+", "c2")
	x.Unsubscribe("$share/h/a/+", "c2")
	x.Unsubscribe("a/+", "c2") // again
	require.Equal(t, []string{"a/+ false", "$share/g/a/+ false", "$share/h/a/+ false"}, events)
	require.Equal(t, "$share/g/x/y", SharedRoute("$SHARE/g/x/y"))
	require.Equal(t, "x/y", SharedRoute("x/y"))
}

// TestDeliverFromPeerKeepsOriginAndSelectsShared: No Local holds for the
// origin's ID, and share groups get the message only when chosen.
func TestDeliverFromPeerKeepsOriginAndSelectsShared(t *testing.T) {
	s := newServer()
	mk := func(id string) (*Client, chan packets.Packet) {
		cl, r, w := newTestClient()
		t.Cleanup(func() { _ = w.Close(); _ = r.Close() })
		cl.ID = id
		cl.Properties.ProtocolVersion = 5
		s.Clients.Add(cl)
		got := make(chan packets.Packet, 10)
		go func() {
			for {
				typ, body, err := readRawPacket(r)
				if err != nil {
					return
				}
				if typ>>4 == packets.Publish {
					pk := packets.Packet{ProtocolVersion: 5}
					_ = pk.FixedHeader.Decode(typ)
					_ = pk.PublishDecode(body)
					got <- pk
				}
			}
		}()
		return cl, got
	}
	_, originGot := mk("origin")
	_, plainGot := mk("plain")
	_, sharedGot := mk("member")
	s.Topics.Subscribe("origin", packets.Subscription{Filter: "a/b", NoLocal: true})
	s.Topics.Subscribe("plain", packets.Subscription{Filter: "a/b"})
	s.Topics.Subscribe("member", packets.Subscription{Filter: "$share/g/a/b"})

	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("1"), Origin: "origin"}
	s.DeliverFromPeer(pk, nil) // not chosen for the group
	pk.Payload = []byte("2")
	s.DeliverFromPeer(pk, func(route string) bool { return route == "$share/g/a/b" })

	require.Equal(t, "1", string((<-plainGot).Payload))
	require.Equal(t, "2", string((<-plainGot).Payload))
	require.Equal(t, "2", string((<-sharedGot).Payload)) // only the chosen one
	select {
	case p := <-originGot:
		t.Fatalf("No Local subscriber got %q from its own publish", p.Payload)
	case p := <-sharedGot:
		t.Fatalf("share group got %q although another node was chosen", p.Payload)
	default:
	}
}

func TestDetachAndAdoptSession(t *testing.T) {
	a, b := newServer(), newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.SessionExpiryInterval, cl.Properties.Props.SessionExpiryIntervalFlag = 300, true
	a.Clients.Add(cl)
	sub := packets.Subscription{Filter: "in/dev", Qos: 1}
	a.Topics.Subscribe("dev", sub)
	cl.State.Subscriptions.Add(sub.Filter, sub)
	for i := 1; i <= 3; i++ {
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i), TopicName: "in/dev"})
	}
	var routes []string
	a.Topics.OnRoute = func(f string, added bool) { routes = append(routes, fmt.Sprintf("%s %t", f, added)) }

	sess, ok := a.DetachSession("dev")
	require.True(t, ok)
	require.Len(t, sess.Subscriptions, 1)
	require.Len(t, sess.Inflight, 3)
	require.Equal(t, uint16(1), sess.Inflight[0].PacketID)
	require.True(t, sess.ExpirySet)
	require.Equal(t, uint32(300), sess.Expiry)
	require.True(t, cl.Closed())
	_, still := a.Clients.Get("dev")
	require.False(t, still)
	require.Equal(t, []string{"in/dev false"}, routes)
	require.Empty(t, a.Topics.Subscribers("in/dev").Subscriptions)
	_, ok = a.DetachSession("dev")
	require.False(t, ok)

	b.AdoptSession("dev", 5, sess)
	held, ok := b.Clients.Get("dev")
	require.True(t, ok)
	require.True(t, held.Closed())
	require.Equal(t, 3, held.State.Inflight.Len())
	require.Contains(t, b.Topics.Subscribers("in/dev").Subscriptions, "dev")
	require.Equal(t, uint32(300), held.Properties.Props.SessionExpiryInterval)

	// Messages for it queue in the adopted session meanwhile.
	b.DeliverFromPeer(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "in/dev", Payload: []byte("x")}, nil)
	require.Equal(t, 4, held.State.Inflight.Len())
}

func TestSubscribeClientServerSide(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	s.Clients.Add(cl)
	var routes []string
	s.Topics.OnRoute = func(f string, added bool) { routes = append(routes, fmt.Sprintf("%s %t", f, added)) }

	require.False(t, s.SubscribeClient(cl, packets.Subscription{Filter: "push/news", Qos: 1}))
	require.True(t, s.SubscribeClient(cl, packets.Subscription{Filter: "push/news", Qos: 1}))
	require.Contains(t, s.Topics.Subscribers("push/news").Subscriptions, "dev")
	_, ok := cl.State.Subscriptions.Get("push/news")
	require.True(t, ok)
	require.Equal(t, int64(1), s.Info.Subscriptions)

	require.True(t, s.UnsubscribeClientFilter(cl, "push/news"))
	require.False(t, s.UnsubscribeClientFilter(cl, "push/news"))
	require.Empty(t, s.Topics.Subscribers("push/news").Subscriptions)
	require.Equal(t, int64(0), s.Info.Subscriptions)
	require.Equal(t, []string{"push/news true", "push/news false"}, routes)
}
