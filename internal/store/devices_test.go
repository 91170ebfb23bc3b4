package store_test

import (
	"fmt"
	"testing"
	"time"

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
