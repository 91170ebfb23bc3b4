package pushapi_test

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

// historyOn turns history capture on for a test broker: the default
// filters plus chat/#, which devices may publish to (the default history
// topics are written by services only, until groups open groups/#).
func historyOn(t testing.TB) func(*broker.Options) {
	dir := t.TempDir()
	return func(o *broker.Options) {
		o.History = config.Defaults().History
		o.History.Topics += ",chat/#"
		o.History.BatchLinger = time.Millisecond
		o.DataDir = filepath.Join(dir, o.Config.NodeName)
	}
}

func historyCluster(t testing.TB, st *store.Store) []*broker.Broker {
	t.Helper()
	b0 := startBroker(t, "b0", "", st, historyOn(t))
	b1 := startBroker(t, "b1", b0.GossipAddr(), st, historyOn(t))
	bs := []*broker.Broker{b0, b1}
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range bs {
			if c := b.Stats().Cluster; c == nil || len(c.Links) != 1 || c.Links[0].State != "up" {
				return fmt.Errorf("%s: node link not up", b.Name())
			}
		}
		return nil
	})
	return bs
}

// storedCount is how many messages history holds, each id once.
func storedCount(t testing.TB, st *store.Store) int64 {
	t.Helper()
	all, err := st.AllHistory(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return int64(len(all))
}

// Messages published by devices on both nodes and by the push API are each
// stored once, by the node they were published to, with their fields; the
// id stored is the one subscribers on the other node see and the one the
// API answered; messages off history topics and denied publishes are not
// stored.
func TestHistoryCapturesEachMessageOnceAcrossTheCluster(t *testing.T) {
	st := storetest.Open(t)
	bs := historyCluster(t, st)
	api := startAPI(t, bs[0].GossipAddr(), st, nil)
	apiNode := api.waitBroker()

	// Subscribers on each node, so every message is forwarded to the
	// other node too.
	var subs []*testutil.V5
	for i, b := range bs {
		s := testutil.MustV5(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("sub%d", i))
		s.Sub(t, "chat/#", 1)
		s.Sub(t, "push/#", 1)
		subs = append(subs, s)
	}
	for i, b := range bs {
		waitRoutes(t, b, bs[1-i].Name(), 2)
	}

	const perDevice = 15
	type sent struct {
		publisher, node, payload string
		qos                      int
	}
	var want []sent
	for i, b := range bs {
		dev := testutil.MustV5(t, b.Addr(broker.ListenerTCP), fmt.Sprintf("dev%d", i))
		for j := range perDevice {
			qos := byte(j % 2)
			p := fmt.Sprintf("dev%d-%d", i, j)
			ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
			_, err := dev.Publish(ctx, &paho.Publish{Topic: "chat/room", QoS: qos, Payload: []byte(p), Properties: &paho.PublishProperties{
				ContentType: "text/plain", User: paho.UserProperties{{Key: "seq", Value: fmt.Sprint(j)}, {Key: "rtm-message-id", Value: "forged"}}}})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, sent{dev.ClientID(), b.Name(), p, int(qos)})
		}
		// Not a history topic; and one a device may not publish to.
		dev.Pub(t, "other/x", 1, false, "not history")
		ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
		pa, err := dev.Publish(ctx, &paho.Publish{Topic: "push/denied", QoS: 1, Payload: []byte("denied")})
		cancel()
		if err == nil && pa.ReasonCode < 0x80 {
			t.Fatalf("a device's publish to push/denied was accepted: %v", pa)
		}
	}
	apiIDs := map[string]bool{}
	for j := range perDevice {
		p := api.publish(map[string]any{"topic": "push/news", "payload": fmt.Sprintf("api-%d", j), "qos": 1,
			"properties": map[string]any{"user": map[string]string{"lang": "en"}}})
		apiIDs[p.ID] = true
		want = append(want, sent{pushapi.KeyName(apiKey), apiNode, fmt.Sprintf("api-%d", j), 1})
	}
	binary := api.publish(map[string]any{"topic": "devices/d9/inbox", "payload_base64": "/wA=", "qos": 0})
	apiIDs[binary.ID] = true
	want = append(want, sent{pushapi.KeyName(apiKey), apiNode, "\xff\x00", 0})

	// Written, not just stored: on the embedded store a message is in
	// pages once its batch's history index is written too.
	testutil.WaitFor(t, waitCond, func() error {
		var written int64
		for _, b := range bs {
			written += b.Stats().History.Written
		}
		if written != int64(len(want)) {
			return fmt.Errorf("%d messages written, want %d", written, len(want))
		}
		return nil
	})
	if n := storedCount(t, st); n != int64(len(want)) {
		t.Fatalf("%d messages stored, want %d", n, len(want))
	}
	var captured int64
	for _, b := range bs {
		h := b.Stats().History
		if h == nil {
			t.Fatalf("%s: no history stats", b.Name())
		}
		captured += h.Captured
	}
	if captured != int64(len(want)) {
		t.Fatalf("captured %d times in all, want %d: a forwarded message was captured again", captured, len(want))
	}

	// Every stored message matches one published, once.
	got, err := st.AllHistory(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	left := slices.Clone(want)
	for _, m := range got {
		i := slices.IndexFunc(left, func(s sent) bool { return s.payload == string(m.Payload) })
		if i < 0 {
			t.Fatalf("stored message %s %q was not published, or is stored twice", m.Topic, m.Payload)
		}
		w := left[i]
		left = slices.Delete(left, i, i+1)
		if m.Publisher != w.publisher || m.Node != w.node || m.QoS != w.qos {
			t.Errorf("%q: publisher %q node %q qos %d, want %q %q %d", m.Payload, m.Publisher, m.Node, m.QoS, w.publisher, w.node, w.qos)
		}
		if _, err := ulid.ParseStrict(m.ID); err != nil {
			t.Errorf("%q: id %q is not a ULID", m.Payload, m.ID)
		}
		if time.Since(m.Time) > time.Minute || m.Time.After(time.Now().Add(time.Second)) {
			t.Errorf("%q: timestamp %v", m.Payload, m.Time)
		}
		switch {
		case strings.HasPrefix(string(m.Payload), "dev"):
			if m.Topic != "chat/room" || m.ContentType != "text/plain" || len(m.User) != 1 || m.User[0].Key != "seq" {
				t.Errorf("%q: topic %q content type %q user %v", m.Payload, m.Topic, m.ContentType, m.User)
			}
		default:
			if !apiIDs[m.ID] {
				t.Errorf("%q: stored id %s is not the one the API answered", m.Payload, m.ID)
			}
		}
	}

	// Subscribers on both nodes saw the stored id (a device's forged one
	// replaced), so a message can be looked up from what a device got.
	for _, s := range subs {
		m := nextOn(t, s, "chat/room")
		id := messageID(m)
		if id == "forged" || id == "" {
			t.Fatalf("subscriber got rtm-message-id %q", id)
		}
		var sm pushapi.StoredMessage
		api.expect("GET", "/v1/messages/"+id, nil, 200, &sm)
		if sm.Topic != "chat/room" || strp(sm.Payload) != string(m.Payload) || sm.Encoding != "text" {
			t.Fatalf("GET /v1/messages/%s = %+v, subscriber got %q", id, sm, m.Payload)
		}
	}
	var sm pushapi.StoredMessage
	api.expect("GET", "/v1/messages/"+binary.ID, nil, 200, &sm)
	if sm.Encoding != "base64" || strp(sm.PayloadBase64) != "/wA=" || sm.Payload != nil || sm.Publisher != pushapi.KeyName(apiKey) {
		t.Fatalf("binary message: %+v", sm)
	}
}

// A walk through a topic's pages returns every message exactly once,
// newest first, while messages are being added; before and after bound it
// by id and by time; bad cursors and times are 400.
func TestHistoryPagesAreStableWhileMessagesArrive(t *testing.T) {
	st := storetest.Open(t)
	b := startBroker(t, "b0", "", st, historyOn(t))
	api := startAPI(t, b.GossipAddr(), st, nil)
	api.waitBroker()

	const n = 60
	var ids []string // oldest first
	for i := 0; i < n; i += 30 {
		var msgs []map[string]any
		for j := i; j < i+30; j++ {
			msgs = append(msgs, map[string]any{"topic": "push/feed", "payload": fmt.Sprint(j)})
		}
		var res pushapi.BatchResults
		api.expect("POST", "/v1/messages/batch", map[string]any{"messages": msgs}, 200, &res)
		for _, r := range res.Results {
			if r.Error != nil {
				t.Fatal(r.Error)
			}
			ids = append(ids, r.ID)
		}
	}
	// Written (messages and, on the embedded store, their index), so the
	// first page holds all n.
	testutil.WaitFor(t, waitCond, func() error {
		if w := b.Stats().History.Written; w != n {
			return fmt.Errorf("%d written, want %d", w, n)
		}
		return nil
	})

	// Keep publishing to the topic during the walk.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var more atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if r, err := api.send("POST", "/v1/messages", apiKey, map[string]any{"topic": "push/feed", "payload": "new"}, nil); err == nil && r.status == 200 {
				more.Add(1)
			}
			time.Sleep(10 * time.Millisecond) // a steady trickle, not a flood

		}
	}()
	var walked []string
	next := "/v1/history?topic=push/feed&limit=8"
	for pages := 0; ; pages++ {
		if pages > 100 {
			t.Fatal("more than 100 pages")
		}
		var page pushapi.HistoryPage
		api.expect("GET", next, nil, 200, &page)
		for _, m := range page.Messages {
			walked = append(walked, m.ID)
		}
		if len(page.Gaps) != 0 {
			t.Fatalf("gaps %v on a complete history", page.Gaps)
		}
		if page.NextCursor == nil {
			break
		}
		next = "/v1/history?limit=8&cursor=" + url.QueryEscape(*page.NextCursor)
		time.Sleep(5 * time.Millisecond) // let inserts interleave with the walk
	}
	close(stop)
	wg.Wait()
	if more.Load() == 0 {
		t.Fatal("no message was published during the walk")
	}
	if !slices.IsSortedFunc(walked, func(a, b string) int { return strings.Compare(b, a) }) {
		t.Fatal("the walk is not newest first")
	}
	for i := 1; i < len(walked); i++ {
		if walked[i] == walked[i-1] {
			t.Fatalf("message %s returned twice", walked[i])
		}
	}
	tail := walked[len(walked)-n:]
	rev := slices.Clone(ids)
	slices.Reverse(rev)
	if !slices.Equal(tail, rev) {
		t.Fatalf("the walk's last %d messages are not the %d published before it, newest first", n, n)
	}

	page := func(q string) []string {
		t.Helper()
		var p pushapi.HistoryPage
		api.expect("GET", "/v1/history?topic=push/feed&"+q, nil, 200, &p)
		var out []string
		for _, m := range p.Messages {
			out = append(out, m.ID)
		}
		return out
	}
	if got := page("limit=5&before=" + ids[40]); !slices.Equal(got, []string{ids[39], ids[38], ids[37], ids[36], ids[35]}) {
		t.Fatalf("before=id: %v", got)
	}
	if got := page("limit=1000&before=" + ids[40] + "&after=" + ids[36]); !slices.Equal(got, []string{ids[39], ids[38], ids[37]}) {
		t.Fatalf("before and after by id: %v", got)
	}
	// By time: bounds exclude the messages of the given millisecond.
	idT := func(id string) time.Time { return ulid.Time(ulid.MustParse(id).Time()) }
	tb, ta := idT(ids[50]), idT(ids[10])
	var wantT []string
	for i := n - 1; i >= 0; i-- {
		if t := idT(ids[i]); t.Before(tb) && t.After(ta) {
			wantT = append(wantT, ids[i])
		}
	}
	if got := page("limit=1000&before=" + tb.Format(time.RFC3339Nano) + "&after=" + ta.Format(time.RFC3339Nano)); !slices.Equal(got, wantT) {
		t.Fatalf("before and after by time: %d messages, want %d", len(got), len(wantT))
	}

	api.expectError("GET", "/v1/history?topic=push/feed&cursor=nonsense", nil, 400, pushapi.CodeBadCursor)
	api.expectError("GET", "/v1/history?cursor="+url.QueryEscape("czE6ZGV2Mg"), nil, 400, pushapi.CodeBadCursor) // a subscribers cursor
	var p pushapi.HistoryPage
	api.expect("GET", "/v1/history?topic=push/feed&limit=1", nil, 200, &p)
	api.expectError("GET", "/v1/history?topic=push/other&cursor="+url.QueryEscape(*p.NextCursor), nil, 400, pushapi.CodeBadCursor)
	api.expectError("GET", "/v1/history?topic=push/feed&before=yesterday", nil, 400, pushapi.CodeBadParameter)
	api.expectError("GET", "/v1/history?topic=push/feed&after=2026-13-01T00:00:00Z", nil, 400, pushapi.CodeBadParameter)
	api.expectError("GET", "/v1/history?topic=push/feed&limit=1001", nil, 400, pushapi.CodeBadParameter)
	api.expectError("GET", "/v1/history", nil, 400, pushapi.CodeBadParameter)
	api.expectError("GET", "/v1/history?topic=push/%2B", nil, 422, pushapi.CodeInvalidTopic)
}
