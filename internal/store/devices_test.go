package store_test

import (
	"fmt"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
)

func TestPresenceFollowsTheLastConnection(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	p, err := s.Presence(ctx, "dev")
	if err != nil || p.Seen || p.Online {
		t.Fatalf("unknown device: %+v, %v", p, err)
	}
	t0 := time.Now().Truncate(time.Millisecond)
	// Connected on a, then on b (takeover); a's disconnect arrives last and
	// must not mark the device offline.
	err = s.WritePresence(ctx, []store.PresenceUpdate{
		{ClientID: "dev", Online: true, Node: "a", Conn: "a/1", At: t0},
		{ClientID: "dev", Online: true, Node: "b", Conn: "b/1", At: t0.Add(time.Second)},
		{ClientID: "dev", Online: false, Node: "a", Conn: "a/1", At: t0.Add(2 * time.Second)},
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err = s.Presence(ctx, "dev")
	if err != nil || !p.Seen || !p.Online || p.Node != "b" || !p.Since.Equal(t0.Add(time.Second).UTC()) || !p.Created.Equal(t0.UTC()) {
		t.Fatalf("after takeover: %+v, %v", p, err)
	}
	if err := s.WritePresence(ctx, []store.PresenceUpdate{{ClientID: "dev", Node: "b", Conn: "b/1", At: t0.Add(3 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	p, _ = s.Presence(ctx, "dev")
	if p.Online || p.Node != "b" || !p.LastSeen.Equal(t0.Add(3*time.Second).UTC()) {
		t.Fatalf("after disconnect: %+v", p)
	}
}

func TestPushSubscriptions(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	for i := range 5 {
		created, err := s.AddPushSubscription(ctx, fmt.Sprintf("d%d", i), "news", store.ViaMQTT)
		if err != nil || !created {
			t.Fatalf("add d%d: %t %v", i, created, err)
		}
	}
	if created, err := s.AddPushSubscription(ctx, "d1", "news", store.ViaAPI); err != nil || created {
		t.Fatalf("add again: %t %v, want not created", created, err)
	}
	if _, err := s.AddPushSubscription(ctx, "d1", "sport", store.ViaAPI); err != nil {
		t.Fatal(err)
	}
	var all []string
	after := ""
	for {
		page, next, err := s.ChannelSubscribers(ctx, "news", after, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range page {
			all = append(all, p.Device+"/"+p.Via)
		}
		if next == "" {
			break
		}
		after = next
	}
	if fmt.Sprint(all) != "[d0/mqtt d1/mqtt d2/mqtt d3/mqtt d4/mqtt]" {
		t.Errorf("pages: %v", all)
	}
	chans, err := s.DeviceChannels(ctx, "d1")
	if err != nil || len(chans) != 2 || chans[0].Channel != "news" || chans[1].Channel != "sport" || chans[1].Via != store.ViaAPI {
		t.Fatalf("channels of d1: %+v, %v", chans, err)
	}
	if removed, err := s.RemovePushSubscription(ctx, "d1", "news"); err != nil || !removed {
		t.Fatalf("remove: %t %v", removed, err)
	}
	if removed, _ := s.RemovePushSubscription(ctx, "d1", "news"); removed {
		t.Error("removed twice")
	}
}

// TestSweepPresence: a broker restarted under the same name marks offline
// what its previous processes recorded online there, and nothing else.
func TestSweepPresence(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	now := time.Now()
	err := s.WritePresence(ctx, []store.PresenceUpdate{
		{ClientID: "old", Online: true, Node: "n1", Incarnation: "1", Conn: "n1/1/1", At: now},
		{ClientID: "legacy", Online: true, Node: "n1", Conn: "n1/0/1", At: now},
		{ClientID: "current", Online: true, Node: "n1", Incarnation: "2", Conn: "n1/2/1", At: now},
		{ClientID: "other", Online: true, Node: "n2", Incarnation: "1", Conn: "n2/1/1", At: now},
	})
	if err != nil {
		t.Fatal(err)
	}
	n, err := s.SweepPresence(ctx, "n1", "2")
	if err != nil || n != 2 {
		t.Fatalf("sweep: %d, %v; want 2 records changed", n, err)
	}
	for id, want := range map[string]bool{"old": false, "legacy": false, "current": true, "other": true} {
		p, err := s.Presence(ctx, id)
		if err != nil || p.Online != want {
			t.Errorf("%s: %+v %v, want online=%t", id, p, err, want)
		}
	}
	online, err := s.OnlineAt(ctx, "n1")
	if err != nil || len(online) != 1 || online[0].ClientID != "current" || online[0].Conn != "n1/2/1" {
		t.Fatalf("online at n1: %+v %v", online, err)
	}
}

// TestDevicesChannels reads the push subscriptions of many devices at once.
func TestDevicesChannels(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	if err := s.AddPushSubscriptions(ctx, []store.PushSubscription{
		{Device: "a", Channel: "x", Via: store.ViaMQTT}, {Device: "a", Channel: "y", Via: store.ViaMQTT}, {Device: "b", Channel: "x", Via: store.ViaMQTT},
	}); err != nil {
		t.Fatal(err)
	}
	if created, err := s.AddPushSubscription(ctx, "a", "x", store.ViaAPI); err != nil || created {
		t.Fatalf("bulk add did not record a/x: %t %v", created, err)
	}
	got, err := s.DevicesChannels(ctx, []string{"a", "c"})
	if err != nil || len(got["a"]) != 2 || len(got["c"]) != 0 || len(got["b"]) != 0 {
		t.Fatalf("channels of a, c: %+v %v", got, err)
	}
}

// TestPresenceRecordsOfVersion1: records written by an rtm that keyed them
// by a generated _id are found after Open rewrites them.
func TestPresenceRecordsOfVersion1(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	at := time.Now().UTC().Truncate(time.Millisecond)
	// Version 1's index, which version 2 drops.
	_, err := s.DB().Collection(store.CollDevices).Indexes().CreateOne(ctx, mongo.IndexModel{Keys: bson.D{{Key: "client_id", Value: 1}},
		Options: options.Index().SetName("client_id_unique").SetUnique(true)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.DB().Collection(store.CollDevices).InsertOne(ctx, bson.D{{Key: "client_id", Value: "v1-dev"}, {Key: "online", Value: true},
		{Key: "node", Value: "n1"}, {Key: "since", Value: at}, {Key: "last_seen", Value: at}, {Key: "conn", Value: "n1/1/1"}, {Key: "created_at", Value: at}})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	p, err := s2.Presence(ctx, "v1-dev")
	if err != nil || !p.Seen || !p.Online || p.Node != "n1" || !p.Since.Equal(at) || p.Conn != "n1/1/1" {
		t.Fatalf("v1 record after the rewrite: %+v %v", p, err)
	}
	if n, err := s2.DB().Collection(store.CollDevices).CountDocuments(ctx, bson.D{}); err != nil || n != 1 {
		t.Fatalf("%d device records, %v; want the one rewritten", n, err)
	}
	specs, err := s2.DB().Collection(store.CollDevices).Indexes().ListSpecifications(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sp := range specs {
		if sp.Name == "client_id_unique" {
			t.Errorf("index client_id_unique kept: a record a version 1 broker inserts would fail every presence write of its client")
		}
	}
}

// TestWritePresenceOfManyDevicesInOneBatch: a batch of presence updates to
// 150 devices recorded already (a fleet reconnecting) is written, and the
// store stays usable meanwhile. FerretDB v1.24.2 held a connection per
// update statement of one command until it ended: at about 100 statements
// the command waited on itself, and stalled the store until the caller's
// context ended (store.MaxStatementsPerCommand).
func TestWritePresenceOfManyDevicesInOneBatch(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 60*time.Second)
	t0 := time.Now().Truncate(time.Millisecond)
	var on, off []store.PresenceUpdate
	for i := range 150 {
		id := fmt.Sprintf("fleet-%03d", i)
		on = append(on, store.PresenceUpdate{ClientID: id, Online: true, Node: "a", Conn: "a/" + id, At: t0})
		off = append(off, store.PresenceUpdate{ClientID: id, Node: "a", Conn: "a/" + id, At: t0.Add(time.Second)})
	}
	if err := s.WritePresence(ctx, on); err != nil {
		t.Fatal(err)
	}
	if err := s.WritePresence(ctx, on); err != nil {
		t.Fatalf("150 updates of recorded devices: %v", err)
	}
	if err := s.WritePresence(ctx, off); err != nil {
		t.Fatalf("150 disconnects: %v", err)
	}
	for _, id := range []string{"fleet-000", "fleet-149"} {
		p, err := s.Presence(ctx, id)
		if err != nil || p.Online || !p.LastSeen.Equal(t0.Add(time.Second).UTC()) {
			t.Fatalf("%s after its disconnect: %+v, %v", id, p, err)
		}
	}
}

// TestDisconnectDoesNotOverwriteNewerConnect: on FerretDB a disconnect is
// checked against the connection read for its batch and written by _id: a
// client moving from a to b whose connect from b is recorded between that
// read and the write stays online at b. Before, it was recorded offline
// while connected, and a survivor of a's death would adopt its session,
// live at b.
func TestDisconnectDoesNotOverwriteNewerConnect(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	t0 := time.Now().Truncate(time.Millisecond)
	if err := s.WritePresence(ctx, []store.PresenceUpdate{{ClientID: "mover", Online: true, Node: "a", Conn: "a/1", At: t0}}); err != nil {
		t.Fatal(err)
	}
	hit := false
	s.SetTestAfterPresenceRead(func() {
		if hit {
			return
		}
		hit = true
		if err := s.WritePresence(ctx, []store.PresenceUpdate{{ClientID: "mover", Online: true, Node: "b", Conn: "b/1", At: t0.Add(time.Second)}}); err != nil {
			t.Error(err)
		}
	})
	err := s.WritePresence(ctx, []store.PresenceUpdate{{ClientID: "mover", Node: "a", Conn: "a/1", At: t0.Add(2 * time.Second)}})
	s.SetTestAfterPresenceRead(nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.Presence(ctx, "mover")
	if err != nil || !p.Online || p.Node != "b" || p.Conn != "b/1" {
		t.Fatalf("after a's disconnect raced b's connect: %+v, %v; want online at b", p, err)
	}
	// b's own disconnect still takes it offline.
	if err := s.WritePresence(ctx, []store.PresenceUpdate{{ClientID: "mover", Node: "b", Conn: "b/1", At: t0.Add(3 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	if p, _ = s.Presence(ctx, "mover"); p.Online {
		t.Fatalf("after b's disconnect: %+v, want offline", p)
	}
}
