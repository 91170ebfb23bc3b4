// rtm patch 17: entry points for a cluster of servers (rtm's node link).
// mochi has no clustering; these let an embedding application move messages
// and sessions between servers with the same semantics as inside one. No
// upstream issue.

package mqtt

import (
	"bytes"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// DeliverFromPeer delivers a message that another server of the cluster
// accepted from its client pk.Origin: it is retained here if pk.Retain is
// set, and published to this server's subscribers as publishToSubscribers
// does, keeping pk.Origin (so No Local holds) and pk.Expiry. Hooks are not
// called for it (OnPublish, OnPublished), so it is not forwarded again.
//
// Shared subscriptions get it only for the groups shared reports true for,
// by route ("$share/{group}/{filter}", see TopicsIndex.OnRoute): the sending
// server chose this one for those groups, and each message goes to one
// member of a group cluster-wide.
func (s *Server) DeliverFromPeer(pk packets.Packet, shared func(route string) bool) {
	if pk.Created == 0 {
		pk.Created = time.Now().Unix()
	}
	if pk.FixedHeader.Retain && s.Options.Capabilities.RetainAvailable != 0 {
		s.Topics.RetainMessage(pk.Copy(false))
		atomic.StoreInt64(&s.Info.Retained, int64(s.Topics.Retained.Len()))
	}
	// Not cachedSubscribers (rtm patch 104): the loop below deletes from
	// the result, which a remembered one shares with every publish.
	subscribers := s.Topics.Subscribers(pk.TopicName)
	for filter := range subscribers.Shared {
		if shared == nil || !shared(SharedRoute(filter)) {
			delete(subscribers.Shared, filter)
		}
	}
	if len(subscribers.Shared) > 0 {
		subscribers = s.hooks.OnSelectSubscribers(subscribers, pk)
		if len(subscribers.SharedSelected) == 0 {
			subscribers.SelectShared()
		}
		subscribers.MergeSharedSelected()
	}
	for _, inline := range subscribers.InlineSubscriptions {
		inline.Handler(s.inlineClient, inline.Subscription, pk)
	}
	// rtm patch 23: a message from a peer waits for congested subscribers
	// like one from a local client (the caller's link receive goroutine is
	// blocked meanwhile, at most FlowControl.PeerMaxWait, or MaxWait, per
	// message).
	var deadline time.Time
	for id, sub := range subscribers.Subscriptions {
		if pk.Exclude != nil && pk.Exclude(id) && !subscribers.isSharedSelected(id) { // rtm patch 24
			continue
		}
		if cl, ok := s.Clients.Get(id); ok {
			if cl = s.pace(nil, cl, sub.Filter, &deadline); cl == nil {
				continue
			}
			if _, err := s.publishToClient(cl, sub, pk); err != nil {
				s.Log.Debug("failed publishing packet from peer", "error", err, "client", cl.ID)
			}
		}
	}
	atomic.AddInt64(&s.Info.MessagesReceived, 1)
}

// DeliverToClient delivers a message that another server of the cluster
// accepted to client id alone, through its subscription that matches
// pk.TopicName (as DeliverFromPeer would, for that one client): a message
// its session missed on the server it moved from. It reports false if id
// has no session here or no matching (non-shared) subscription.
// rtm patch 91.
func (s *Server) DeliverToClient(id string, pk packets.Packet) bool {
	cl, ok := s.Clients.Get(id)
	if !ok {
		return false
	}
	sub, ok := s.Topics.Subscribers(pk.TopicName).Subscriptions[id]
	if !ok {
		return false
	}
	if pk.Created == 0 {
		pk.Created = time.Now().Unix()
	}
	if _, err := s.publishToClient(cl, sub, pk); err != nil {
		// rtm patch 93: the session left between the lookup above and the
		// delivery: not delivered, so the caller can send it on.
		if errors.Is(err, ErrSessionLeft) {
			return false
		}
		s.Log.Debug("failed publishing packet from peer", "error", err, "client", cl.ID)
	}
	return true
}

// RetainFromPeer sets (or, with an empty payload, clears) the retained
// message of pk.TopicName as another server of the cluster did, without
// publishing it.
func (s *Server) RetainFromPeer(pk packets.Packet) {
	if s.Options.Capabilities.RetainAvailable == 0 {
		return
	}
	s.Topics.RetainMessage(pk.Copy(false))
	atomic.StoreInt64(&s.Info.Retained, int64(s.Topics.Retained.Len()))
}

// SharedRoute returns the route of a shared subscription filter:
// "$share/{group}/{filter}" with the prefix in lower case; other filters are
// returned as they are.
func SharedRoute(filter string) string {
	if len(filter) > len(SharePrefix) && strings.EqualFold(filter[:len(SharePrefix)], SharePrefix) && filter[len(SharePrefix)] == '/' {
		group, _ := isolateParticle(filter, 1)
		return sharedRoute(group, filter)
	}
	return filter
}

// Session is what moves with a client between servers: its subscriptions
// and its QoS 1/2 messages not acknowledged or not sent yet.
type Session struct {
	Subscriptions []packets.Subscription
	Inflight      []packets.Packet // in packet order
	// Expiry is the session expiry interval in seconds, if ExpirySet
	// (MQTT 5); otherwise the server's maximum applies.
	Expiry    uint32
	ExpirySet bool
	// PacketID is the last packet identifier the server assigned to the
	// client's messages (0: unknown). A server that adopts the session
	// assigns the next ones after it rather than from 1, so an identifier
	// the old server used recently is not reused at once (rtm keys stored
	// messages by client and packet identifier, and the old server's late
	// deletes must not hit the new server's messages). rtm patch 38.
	PacketID uint32
}

// DetachResult is what DetachSession did (rtm patch 119).
type DetachResult uint8

const (
	// Detached: the session was removed from this server and returned.
	Detached DetachResult = iota
	// DetachNotFound: this server has no session for the client ID.
	DetachNotFound
	// DetachTakenOver: a newer connection of the client ID to this server
	// took the session over while DetachSession waited for it; the session
	// stays here, with that connection, and nothing is returned.
	DetachTakenOver
)

// DetachSession ends the session of client id on this server because the
// client connected to another server: a connected client gets DISCONNECT
// 0x8E (session taken over), and the session is removed from this server
// (its subscriptions leave the index) and returned (Detached). It returns
// DetachNotFound if this server has no session for id, and DetachTakenOver
// if a CONNECT here took it over meanwhile.
func (s *Server) DetachSession(id string) (sess Session, res DetachResult) {
	existing, ok := s.Clients.Get(id)
	if !ok {
		return sess, DetachNotFound
	}
	return s.DetachClient(existing)
}

// DetachClient is DetachSession for the session of client existing, as
// the caller found it in Clients: if another client of its ID replaced it
// there since (a CONNECT took the session over), it returns
// DetachTakenOver and leaves both as they are (rtm patch 119). A caller
// that decided to end the session from what it read of existing (rtm's
// partition heal compares when the session was established) detaches
// only that one, not a newer connection that came in between.
func (s *Server) DetachClient(existing *Client) (sess Session, res DetachResult) {
	id := existing.ID
	if cur, ok := s.Clients.Get(id); !ok {
		return sess, DetachNotFound
	} else if cur != existing {
		return sess, DetachTakenOver
	}
	_ = s.DisconnectClient(existing, packets.ErrSessionTakenOver) // [MQTT-3.1.4-3]
	if f := s.testBeforeDetach; f != nil {
		f(existing)
	}
	// rtm patch 92: deliveries to existing wait until it is gone (they then
	// find no client here; the cluster relays them to its new server).
	existing.State.takeover.Lock()
	defer existing.State.takeover.Unlock()
	// rtm patch 119: a CONNECT of id here (inheritClientSession) may have
	// taken existing over between the lookup and the lock: it copied the
	// session, marked existing taken over and replaced it in Clients, all
	// under this lock. Checked and removed under the lock, and deleted only
	// if still existing (Clients.Remove), as endExpiredSession does (rtm
	// patch 115): v2.7.9's pattern (look up, lock, delete by ID) deleted
	// the newer connection from Clients, connected and unreachable, and
	// returned an empty session as if detached.
	if existing.IsTakenOver() {
		return sess, DetachTakenOver
	}
	if cur, ok := s.Clients.Get(id); !ok {
		return sess, DetachNotFound // ended meanwhile (endExpiredSession)
	} else if cur != existing {
		return sess, DetachTakenOver
	}
	for _, sub := range existing.State.Subscriptions.GetAll() {
		sess.Subscriptions = append(sess.Subscriptions, sub)
	}
	sess.Inflight = existing.State.Inflight.GetAll(false)
	sess.PacketID = atomic.LoadUint32(&existing.State.packetID) // rtm patch 38
	if existing.Properties.ProtocolVersion == 5 && existing.Properties.Props.SessionExpiryIntervalFlag {
		sess.Expiry, sess.ExpirySet = existing.Properties.Props.SessionExpiryInterval, true
	}
	s.UnsubscribeClient(existing)
	// rtm patch 77: taken over after UnsubscribeClient (which skips
	// taken-over clients) but before ClearInflights, so an OnQosDropped
	// hook can tell messages that move with the session from a drop.
	existing.State.isTakenOver.Store(true)
	existing.ClearInflights()
	s.Clients.Remove(existing)
	return sess, Detached
}

// AdoptSession installs a session that moved here from another server, as
// if client id had been connected here and gone: the client's CONNECT (with
// clean start false) inherits it, and messages for its subscriptions are
// queued in it meanwhile. A session this server already holds for id is
// merged into.
func (s *Server) AdoptSession(id string, protocolVersion byte, sess Session) {
	cl, ok := s.Clients.Get(id)
	if !ok {
		cl = s.NewClient(nil, "cluster", id, false)
		cl.Properties.ProtocolVersion = protocolVersion
		cl.Properties.Clean = false
		cl.Properties.Props.SessionExpiryInterval = sess.Expiry
		cl.Properties.Props.SessionExpiryIntervalFlag = sess.ExpirySet
		cl.Stop(packets.ErrSessionTakenOver) // offline: publishToClient only queues
		s.Clients.Add(cl)
	}
	// rtm patch 121: the packet id counter and the queue first, the
	// subscriptions last. A message delivered to id meanwhile (a publisher
	// here) reaches it only through them, so it queues after the moved
	// messages, with a packet id past theirs. Subscribed first, it took
	// its place among the queued messages still being set (delivered
	// before older ones), and maybe the id of one, which was then skipped
	// as present.
	if sess.PacketID != 0 { // rtm patch 38
		cl.State.packetIDMu.Lock()
		atomic.StoreUint32(&cl.State.packetID, sess.PacketID)
		cl.State.packetIDMu.Unlock()
	}
	s.adoptInflight(cl, sess.Inflight)
	for _, sub := range sess.Subscriptions {
		if s.Topics.Subscribe(id, sub) {
			atomic.AddInt64(&s.Info.Subscriptions, 1)
		}
		cl.State.Subscriptions.Add(sub.Filter, sub)
	}
}

// SubscribeClient subscribes client cl to sub on the server's initiative
// (an application's "server-side" subscription), as a SUBSCRIBE from it
// would, without SUBACK: cl may be connected or an offline session, whose
// matching messages are then kept for it. A connected client gets the
// filter's retained messages per sub's retain handling. No hook is called.
// existed reports that cl was already subscribed to the filter (it is
// updated to sub).
func (s *Server) SubscribeClient(cl *Client, sub packets.Subscription) (existed bool) {
	if sub.Qos > s.Options.Capabilities.MaximumQos {
		sub.Qos = s.Options.Capabilities.MaximumQos
	}
	isNew := s.Topics.Subscribe(cl.ID, sub)
	if isNew {
		atomic.AddInt64(&s.Info.Subscriptions, 1)
	}
	cl.State.Subscriptions.Add(sub.Filter, sub)
	if !cl.Closed() && cl.Net.Conn != nil {
		s.publishRetainedToClient(cl, sub, !isNew)
	}
	return !isNew
}

// UnsubscribeClientFilter removes one subscription of cl on the server's
// initiative, as an UNSUBSCRIBE would, without UNSUBACK or hooks. It
// reports whether cl had it.
func (s *Server) UnsubscribeClientFilter(cl *Client, filter string) bool {
	if _, ok := cl.State.Subscriptions.Get(filter); !ok {
		return false
	}
	cl.State.Subscriptions.Delete(filter)
	if s.Topics.Unsubscribe(filter, cl.ID) {
		atomic.AddInt64(&s.Info.Subscriptions, -1)
	}
	return true
}

// RefuseSession makes the server refuse cl's CONNECT with code (a CONNACK
// error, mapped to its MQTT 3.1.1 return code for a v3 client) instead of
// establishing its session. Only an OnSessionEstablish hook may call it,
// on the connection's own goroutine (rtm patch 47).
func (cl *Client) RefuseSession(code packets.Code) {
	cl.State.rtm.refused = &code
}

// SessionRefused reports whether an OnSessionEstablish hook refused cl's
// session (RefuseSession), so a hook called after it does no work for a
// CONNECT that will be refused. Same goroutine as RefuseSession. rtm
// patch 34.
func (cl *Client) SessionRefused() bool {
	return cl.State.rtm.refused != nil
}

// adoptInflight sets the messages of a session adopted by AdoptSession
// into cl's, in their order. rtm patch 126: a message whose packet ID a
// message of cl's session holds already (a merge: the two sessions
// numbered their messages each with its own counter) is not skipped as
// present unless it is that message: a PUBLISH is given a packet ID free
// in both and reported to OnQosPublish under it (a storage hook stores it
// under its new ID; its old ID belongs to the other message). Patch 17
// skipped it: lost, no hook told, not counted. A PUBREL cannot change its
// ID (the client holds the message under it); one whose ID the session
// uses for another message stays out and is logged.
func (s *Server) adoptInflight(cl *Client, list []packets.Packet) {
	var moved map[uint16]struct{} // the adopted IDs, none of which a new ID may take
	for _, pk := range list {
		cur, ok := cl.State.Inflight.Get(pk.PacketID)
		if !ok {
			if cl.State.Inflight.Set(pk) {
				atomic.AddInt64(&s.Info.Inflight, 1)
			}
			continue
		}
		if sameInflight(&cur, &pk) {
			continue // adopted already
		}
		if pk.FixedHeader.Type != packets.Publish {
			s.Log.Warn("adopted session's PUBREL not kept: its packet ID is in use by another message of the session",
				"client", cl.ID, "packet_id", pk.PacketID)
			continue
		}
		if moved == nil {
			moved = make(map[uint16]struct{}, len(list))
			for _, m := range list {
				moved[m.PacketID] = struct{}{}
			}
		}
		id, err := s.freePacketID(cl, moved)
		if err != nil {
			// Every ID in use: as a delivery to a full session, dropped
			// and reported.
			s.hooks.OnPacketIDExhausted(cl, pk)
			continue
		}
		pk.PacketID = id
		if cl.State.Inflight.Set(pk) {
			atomic.AddInt64(&s.Info.Inflight, 1)
		}
		pk.FixedHeader.Dup = false // a new message under id for a storage hook
		s.hooks.OnQosPublish(cl, pk, pk.Created, 0)
	}
}

// freePacketID returns the next packet ID of cl's session not in use and
// not in reserved. rtm patch 126.
func (s *Server) freePacketID(cl *Client, reserved map[uint16]struct{}) (uint16, error) {
	for n := 0; n < 65536; n++ {
		i, err := cl.NextPacketID()
		if err != nil {
			return 0, err
		}
		if _, ok := reserved[uint16(i)]; !ok {
			return uint16(i), nil
		}
	}
	return 0, packets.ErrQuotaExceeded
}

// sameInflight reports whether a and b are the same message of a session
// (adopted twice), not two messages under one packet ID. rtm patch 126.
func sameInflight(a, b *packets.Packet) bool {
	return a.FixedHeader.Type == b.FixedHeader.Type && a.Origin == b.Origin && a.Created == b.Created &&
		a.TopicName == b.TopicName && bytes.Equal(a.Payload, b.Payload)
}
