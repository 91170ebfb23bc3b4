package pushapi_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestGroupsCRUD: groups through real HTTP on the embedded store: create
// with and without an ID, read, update, list by member in pages, members
// added and removed idempotently up to groups.max_members, delete; and bad
// input of every kind gets its JSON error.
func TestGroupsCRUD(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	bs := startCluster(t, 1, st)
	api := startAPI(t, bs[0].GossipAddr(), st, func(o *pushapi.Options) { o.Groups.MaxMembers = 3 })

	var g pushapi.Group
	r := api.expect(http.MethodPost, "/v1/groups", map[string]any{"id": "team-1", "name": "Team one",
		"attributes": map[string]string{"site": "lyon"}, "members": []string{"d2", "d1", "d2"}}, http.StatusCreated, &g)
	if g.ID != "team-1" || g.Name != "Team one" || g.Attributes["site"] != "lyon" || g.MemberCount == nil || *g.MemberCount != 2 ||
		g.CreatedAt.IsZero() || !g.UpdatedAt.Equal(g.CreatedAt) || r.header.Get("Location") != "/v1/groups/team-1" {
		t.Fatalf("created: %s (Location %q)", r, r.header.Get("Location"))
	}
	api.expectError(http.MethodPost, "/v1/groups", map[string]any{"id": "team-1"}, http.StatusConflict, "group_exists")
	var anon pushapi.Group
	api.expect(http.MethodPost, "/v1/groups", map[string]any{}, http.StatusCreated, &anon)
	if len(anon.ID) != 26 || anon.Attributes == nil || *anon.MemberCount != 0 {
		t.Fatalf("group without an ID: %+v, want a ULID, {} attributes, no members", anon)
	}

	// Bad input.
	for _, tc := range []struct {
		body   any
		status int
		code   string
	}{
		{map[string]any{"id": "a/b"}, 422, "invalid_group_id"},
		{map[string]any{"id": "a+"}, 422, "invalid_group_id"},
		{map[string]any{"id": ""}, 422, "invalid_group_id"},
		{map[string]any{"id": string(make([]byte, 257))}, 422, "invalid_group_id"},
		{map[string]any{"name": 7}, 400, "wrong_type"},
		{map[string]any{"nme": "x"}, 400, "unknown_field"},
		{`{"id": "x"`, 400, "malformed_json"},
		{map[string]any{"attributes": map[string]string{"a.b": "x"}}, 422, "invalid_group"},
		{map[string]any{"attributes": map[string]string{"$a": "x"}}, 422, "invalid_group"},
		{map[string]any{"name": "bad\x00name"}, 422, "invalid_group"},
		{map[string]any{"members": []string{"$SYS"}}, 422, "invalid_device_id"},
		{map[string]any{"members": []string{"a", "b", "c", "d"}}, 409, "group_full"},
	} {
		api.expectError(http.MethodPost, "/v1/groups", tc.body, tc.status, tc.code)
	}

	// Read and update.
	var got pushapi.Group
	api.expect(http.MethodGet, "/v1/groups/team-1", nil, http.StatusOK, &got)
	if got.ID != "team-1" || got.Name != "Team one" || *got.MemberCount != 2 || !got.CreatedAt.Equal(g.CreatedAt) {
		t.Fatalf("GET: %+v, want %+v", got, g)
	}
	api.expectError(http.MethodGet, "/v1/groups/nope", nil, http.StatusNotFound, "not_found")
	api.expectError(http.MethodGet, "/v1/groups/a%2Fb", nil, http.StatusUnprocessableEntity, "invalid_group_id")
	got = pushapi.Group{} // decoding merges into a map it holds
	api.expect(http.MethodPatch, "/v1/groups/team-1", map[string]any{"name": "Team 1", "attributes": map[string]any{"site": nil, "floor": "2"}}, http.StatusOK, &got)
	if got.Name != "Team 1" || len(got.Attributes) != 1 || got.Attributes["floor"] != "2" || got.UpdatedAt.Before(g.UpdatedAt) || got.MemberCount != nil {
		t.Fatalf("PATCH: %+v", got)
	}
	got = pushapi.Group{}
	api.expect(http.MethodPatch, "/v1/groups/team-1", map[string]any{"attributes": map[string]any{"x": "y"}}, http.StatusOK, &got)
	if got.Name != "Team 1" || len(got.Attributes) != 2 {
		t.Fatalf("PATCH of one attribute changed others: %+v", got)
	}
	api.expectError(http.MethodPatch, "/v1/groups/nope", map[string]any{"name": "x"}, http.StatusNotFound, "not_found")
	api.expectError(http.MethodPatch, "/v1/groups/team-1", map[string]any{"members": []string{}}, http.StatusBadRequest, "unknown_field")
	api.expectError(http.MethodPatch, "/v1/groups/team-1", map[string]any{"attributes": map[string]any{"": "x"}}, http.StatusUnprocessableEntity, "invalid_group")

	// Members: idempotent, bounded (max 3 here).
	var m pushapi.GroupMembership
	api.expect(http.MethodPut, "/v1/groups/team-1/members/d3", nil, http.StatusCreated, &m)
	if !m.Added || m.Group != "team-1" || m.Device != "d3" {
		t.Fatalf("PUT member: %+v", m)
	}
	api.expect(http.MethodPut, "/v1/groups/team-1/members/d3", nil, http.StatusOK, &m)
	if m.Added {
		t.Fatalf("PUT member again: %+v, want added false", m)
	}
	api.expectError(http.MethodPut, "/v1/groups/team-1/members/d4", nil, http.StatusConflict, "group_full")
	api.expect(http.MethodPut, "/v1/groups/team-1/members/d1", nil, http.StatusOK, nil) // a member of a full group
	api.expectError(http.MethodPut, "/v1/groups/nope/members/d1", nil, http.StatusNotFound, "not_found")
	api.expectError(http.MethodPut, "/v1/groups/team-1/members/$x", nil, http.StatusUnprocessableEntity, "invalid_device_id")
	api.expect(http.MethodDelete, "/v1/groups/team-1/members/d3", nil, http.StatusNoContent, nil)
	api.expect(http.MethodDelete, "/v1/groups/team-1/members/d3", nil, http.StatusNoContent, nil)
	api.expectError(http.MethodDelete, "/v1/groups/nope/members/d3", nil, http.StatusNotFound, "not_found")
	api.expect(http.MethodPut, "/v1/groups/team-1/members/d4", nil, http.StatusCreated, nil) // room again
	var ms pushapi.GroupMembers
	api.expect(http.MethodGet, "/v1/groups/team-1/members?limit=2", nil, http.StatusOK, &ms)
	if !slices.Equal(ms.Members, []string{"d1", "d2"}) || ms.NextCursor == nil {
		t.Fatalf("members page 1: %+v", ms)
	}
	api.expect(http.MethodGet, "/v1/groups/team-1/members?limit=2&cursor="+*ms.NextCursor, nil, http.StatusOK, &ms)
	if !slices.Equal(ms.Members, []string{"d4"}) || ms.NextCursor != nil {
		t.Fatalf("members page 2: %+v", ms)
	}
	membersCursor := "x"
	api.expect(http.MethodGet, "/v1/groups/team-1/members?limit=1", nil, http.StatusOK, &ms)
	membersCursor = *ms.NextCursor

	// Lists by member, in pages.
	for i := range 5 {
		members := []string{"other"}
		if i%2 == 0 {
			members = append(members, "lister")
		}
		api.expect(http.MethodPost, "/v1/groups", map[string]any{"id": fmt.Sprintf("l-%d", i), "members": members}, http.StatusCreated, nil)
	}
	var ids []string
	var cursor *string
	for pages := 0; ; pages++ {
		path := "/v1/groups?member=lister&limit=2"
		if cursor != nil {
			path += "&cursor=" + *cursor
		}
		var page pushapi.Groups
		api.expect(http.MethodGet, path, nil, http.StatusOK, &page)
		for _, g := range page.Groups {
			ids = append(ids, g.ID)
		}
		if cursor = page.NextCursor; cursor == nil {
			break
		}
		if pages > 5 {
			t.Fatal("pages never end")
		}
	}
	if !slices.Equal(ids, []string{"l-0", "l-2", "l-4"}) {
		t.Fatalf("groups of lister: %v", ids)
	}
	var all pushapi.Groups
	api.expect(http.MethodGet, "/v1/groups?limit=1000", nil, http.StatusOK, &all)
	if len(all.Groups) != 7 || all.NextCursor != nil {
		t.Fatalf("every group: %d, next %v, want 7", len(all.Groups), all.NextCursor)
	}
	for _, q := range []string{"limit=0", "limit=1001", "limit=x", "member=", "member=a/b", "cursor=!!!", "cursor=bm9wZQ", "cursor=" + membersCursor} {
		e := api.expectError(http.MethodGet, "/v1/groups?"+q, nil, http.StatusBadRequest, map[bool]string{true: "bad_cursor", false: "bad_parameter"}[q[0] == 'c'])
		_ = e
	}

	// Delete.
	api.expect(http.MethodDelete, "/v1/groups/l-0", nil, http.StatusNoContent, nil)
	api.expectError(http.MethodGet, "/v1/groups/l-0", nil, http.StatusNotFound, "not_found")
	api.expectError(http.MethodDelete, "/v1/groups/l-0", nil, http.StatusNotFound, "not_found")
	var page pushapi.Groups
	api.expect(http.MethodGet, "/v1/groups?member=lister", nil, http.StatusOK, &page)
	if len(page.Groups) != 2 || page.Groups[0].ID != "l-2" {
		t.Fatalf("groups of lister after a delete: %+v", page.Groups)
	}
	// A group created again with a deleted one's ID starts empty.
	api.expect(http.MethodPost, "/v1/groups", map[string]any{"id": "l-0"}, http.StatusCreated, &got)
	api.expect(http.MethodGet, "/v1/groups/l-0", nil, http.StatusOK, &got)
	if *got.MemberCount != 0 {
		t.Fatalf("re-created group has %d members", *got.MemberCount)
	}
	api.expectError(http.MethodPost, "/v1/groups/nope/messages", map[string]any{"payload": "x"}, http.StatusNotFound, "not_found")
}

// groupsCluster is two brokers, a push API connected to b0, and a group g.
func groupsCluster(t *testing.T) (b0, b1 *broker.Broker, api *testAPI) {
	st := storetest.Open(t)
	bs := startCluster(t, 2, st)
	b0, b1 = bs[0], bs[1]
	api = startAPI(t, b0.GossipAddr(), st, nil)
	if api.waitBroker() != "b0" {
		// The push API connects to a broker the router would pick; the
		// tests below only need it connected.
		t.Logf("push API connected to %s", api.Broker())
	}
	api.expect(http.MethodPost, "/v1/groups", map[string]any{"id": "g", "members": []string{"m0", "m1", "w1", "x1", "r1"}}, http.StatusCreated, nil)
	return b0, b1, api
}

// subReason subscribes c to filter at QoS 1 and returns the SUBACK reason.
func subReason(t *testing.T, c *testutil.V5, filter string) byte {
	t.Helper()
	sa, err := c.Subscribe(testutil.Context(t, waitMsg), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if sa == nil || len(sa.Reasons) != 1 { // paho also returns an error for a refusal
		t.Fatalf("%s subscribe %s: %v, %+v", c.ClientID(), filter, err, sa)
	}
	return sa.Reasons[0]
}

// pubReason publishes at QoS 1 and returns the PUBACK reason.
func pubReason(t *testing.T, c *testutil.V5, topic, payload string) byte {
	t.Helper()
	pr, err := c.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
	if pr == nil {
		t.Fatalf("%s publish %s: %v", c.ClientID(), topic, err)
	}
	return pr.ReasonCode
}

// TestGroupTopicAccess: members subscribe and publish to groups/{id} on
// either node, the push API posts to the group; a non-member gets 0x87 on
// SUBACK and PUBACK (MQTT 5), SUBACK 0x80 and a closed connection for a
// QoS 1 publish (MQTT 3.1.1), and never a delivery through a wildcard.
func TestGroupTopicAccess(t *testing.T) {
	t.Parallel()
	b0, b1, api := groupsCluster(t)
	m0 := testutil.MustV5(t, b0.Addr(broker.ListenerTCP), "m0")
	m1 := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "m1")
	stranger := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "stranger")
	m1.Sub(t, "groups/g", 1)
	waitRoutes(t, b0, "b1", 1)
	m0.Pub(t, "groups/g", 1, false, "from m0")
	if got := nextOn(t, m1, "groups/g"); string(got.Payload) != "from m0" {
		t.Fatalf("m1 got %q", got.Payload)
	}
	var pub pushapi.Published
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "from api"}, http.StatusOK, &pub)
	if got := nextOn(t, m1, "groups/g"); string(got.Payload) != "from api" || messageID(got) != pub.ID || pub.Topic != "groups/g" || pub.QoS != 1 {
		t.Fatalf("m1 got %q id %q, API answered %+v", got.Payload, messageID(got), pub)
	}

	if rc := subReason(t, stranger, "groups/g"); rc != 0x87 {
		t.Fatalf("non-member SUBACK 0x%02X, want 0x87", rc)
	}
	if rc := subReason(t, stranger, "groups/g/sub"); rc != 0x87 {
		t.Fatalf("non-member SUBACK under the group 0x%02X, want 0x87", rc)
	}
	if rc := pubReason(t, stranger, "groups/g", "intruder"); rc != 0x87 {
		t.Fatalf("non-member PUBACK 0x%02X, want 0x87", rc)
	}
	// A wildcard is granted, and delivers only the device's own groups.
	stranger.Sub(t, "groups/+", 1)
	m1.Sub(t, "groups/+", 1)
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "second"}, http.StatusOK, nil)
	if got := nextOn(t, m1, "groups/g"); string(got.Payload) != "second" { // once: overlapping subscriptions deliver once
		t.Fatalf("m1 got %q", got.Payload)
	}
	stranger.None(t, 200*time.Millisecond)

	// MQTT 3.1.1: SUBACK 0x80, and a denied QoS 1 publish closes the
	// connection (3.1.1 has no negative PUBACK).
	v3, err := testutil.DialV3(t, b1.Addr(broker.ListenerTCP), "stranger3", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok := v3.Subscribe("groups/g", 1, nil)
	testutil.Wait(t, tok)
	if rc := tok.(interface{ Result() map[string]byte }).Result()["groups/g"]; rc != 0x80 {
		t.Fatalf("v3.1.1 non-member SUBACK 0x%02X, want 0x80", rc)
	}
	v3.Publish("groups/g", 1, false, "intruder")
	testutil.WaitFor(t, waitMsg, func() error {
		if v3.IsConnectionOpen() {
			return fmt.Errorf("v3.1.1 non-member still connected after a denied QoS 1 publish")
		}
		return nil
	})
	// A 3.1.1 member is served.
	r1, err := testutil.DialV3(t, b1.Addr(broker.ListenerTCP), "r1", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok = r1.Subscribe("groups/g", 1, nil)
	testutil.Wait(t, tok)
	if rc := tok.(interface{ Result() map[string]byte }).Result()["groups/g"]; rc != 1 {
		t.Fatalf("v3.1.1 member SUBACK 0x%02X, want 1", rc)
	}
	testutil.Wait(t, r1.Publish("groups/g", 1, false, "from r1"))
	if got := nextOn(t, m1, "groups/g"); string(got.Payload) != "from r1" {
		t.Fatalf("m1 got %q", got.Payload)
	}
	stranger.None(t, 100*time.Millisecond)
}

// TestGroupMembershipChangesApplyEverywhere: a membership change made
// through the API (connected to b0) holds on b1 as soon as the API
// answers, which is within a second: a removed member already subscribed
// on b1 stops receiving (its exact subscription is removed, its wildcard
// one delivers nothing of the group), and a device added while connected
// to b1 may subscribe at once. Re-adding a removed member does not
// subscribe it again.
func TestGroupMembershipChangesApplyEverywhere(t *testing.T) {
	t.Parallel()
	b0, b1, api := groupsCluster(t)
	m0 := testutil.MustV5(t, b0.Addr(broker.ListenerTCP), "m0")
	m1 := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "m1") // stays a member: the control
	w1 := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "w1") // removed, subscribed to the group
	x1 := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "x1") // removed, subscribed by wildcard
	late := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "late")
	m1.Sub(t, "groups/g", 1)
	w1.Sub(t, "groups/g", 1)
	x1.Sub(t, "groups/+", 1)
	if rc := subReason(t, late, "groups/g"); rc != 0x87 { // b1 now holds late as not a member
		t.Fatalf("late SUBACK before being added: 0x%02X, want 0x87", rc)
	}
	waitRoutes(t, b0, "b1", 2)
	m0.Pub(t, "groups/g", 1, false, "before")
	nextOn(t, m1, "groups/g")
	nextOn(t, w1, "groups/g")
	nextOn(t, x1, "groups/g")

	start := time.Now()
	api.expect(http.MethodDelete, "/v1/groups/g/members/w1", nil, http.StatusNoContent, nil)
	api.expect(http.MethodDelete, "/v1/groups/g/members/x1", nil, http.StatusNoContent, nil)
	api.expect(http.MethodPut, "/v1/groups/g/members/late", nil, http.StatusCreated, nil)
	took := time.Since(start)
	// Enforced on b1 now: the control member gets the next message, w1
	// gets nothing; late subscribes.
	m0.Pub(t, "groups/g", 1, false, "after")
	if got := nextOn(t, m1, "groups/g"); string(got.Payload) != "after" {
		t.Fatalf("m1 got %q", got.Payload)
	}
	w1.None(t, 300*time.Millisecond)
	x1.None(t, 10*time.Millisecond)
	if rc := subReason(t, late, "groups/g"); rc != 1 {
		t.Fatalf("late SUBACK once added: 0x%02X, want 1 (granted)", rc)
	}
	if rc := pubReason(t, w1, "groups/g", "removed"); rc != 0x87 {
		t.Fatalf("removed member's PUBACK 0x%02X, want 0x87", rc)
	}
	if took > time.Second*raceScale {
		t.Errorf("removing two members and adding one took %v", took)
	}
	t.Logf("two DELETEs and a PUT of a member (both brokers told) took %v", took)
	waitRoutes(t, b0, "b1", 2)
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "to late"}, http.StatusOK, nil)
	if got := nextOn(t, late, "groups/g"); string(got.Payload) != "to late" {
		t.Fatalf("late got %q", got.Payload)
	}

	// Re-added, w1 is not subscribed again (its subscription to the group
	// was removed); x1's wildcard subscription delivers the group again.
	api.expect(http.MethodPut, "/v1/groups/g/members/w1", nil, http.StatusCreated, nil)
	api.expect(http.MethodPut, "/v1/groups/g/members/x1", nil, http.StatusCreated, nil)
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "again"}, http.StatusOK, nil)
	nextOn(t, m1, "groups/g")
	if got := nextOn(t, x1, "groups/g"); string(got.Payload) != "again" {
		t.Fatalf("x1 got %q", got.Payload)
	}
	w1.None(t, 300*time.Millisecond)

	// Deleting the group removes every member's access at once.
	api.expect(http.MethodDelete, "/v1/groups/g", nil, http.StatusNoContent, nil)
	if rc := pubReason(t, m0, "groups/g", "gone"); rc != 0x87 {
		t.Fatalf("member of a deleted group: PUBACK 0x%02X, want 0x87", rc)
	}
	if rc := subReason(t, m1, "groups/g"); rc != 0x87 {
		t.Fatalf("member of a deleted group: SUBACK 0x%02X, want 0x87", rc)
	}
}

// TestGroupRefreshRepairsMissedChange: a broker that missed a change
// notice (here: changes written to the store behind the push API's back)
// is right after its next refresh (groups.refresh_interval).
func TestGroupRefreshRepairsMissedChange(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	b := startBroker(t, "b0", "", st, func(o *broker.Options) { o.Groups.RefreshInterval = time.Second })
	ctx := testutil.Context(t, waitCond)
	if err := st.CreateGroup(ctx, &store.Group{ID: "g"}, []string{"in"}); err != nil {
		t.Fatal(err)
	}
	in := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "in")
	out := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "out")
	if rc := pubReason(t, in, "groups/g", "x"); rc != 0 {
		t.Fatalf("member PUBACK 0x%02X", rc)
	}
	if rc := pubReason(t, out, "groups/g", "x"); rc != 0x87 {
		t.Fatalf("non-member PUBACK 0x%02X", rc)
	}
	if _, err := st.RemoveGroupMember(ctx, "g", "in"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddGroupMember(ctx, "g", "out", 10); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if rc := pubReason(t, in, "groups/g", "x"); rc != 0x87 {
			return fmt.Errorf("removed member's PUBACK 0x%02X, want 0x87", rc)
		}
		if rc := pubReason(t, out, "groups/g", "x"); rc != 0 {
			return fmt.Errorf("added member's PUBACK 0x%02X, want 0", rc)
		}
		return nil
	})
}

// TestGroupSessionsAcrossNodes: a member's persistent session keeps its
// group subscription when the device reconnects to the other node (its
// memberships are read there), and a member removed while away gets
// nothing of the group when it comes back (its offline session lost the
// subscription).
func TestGroupSessionsAcrossNodes(t *testing.T) {
	t.Parallel()
	b0, b1, api := groupsCluster(t)
	persistent := func(id string, clean bool) *paho.Connect {
		return &paho.Connect{ClientID: id, CleanStart: clean, Properties: &paho.ConnectProperties{
			SessionExpiryInterval: ptr(uint32(300)), RequestProblemInfo: true}}
	}
	dial := func(b *broker.Broker, id string, clean bool) *testutil.V5 {
		c, _, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), persistent(id, clean))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// m1 subscribes on b1, then reconnects to b0: its session moves.
	c := dial(b1, "m1", true)
	c.Sub(t, "groups/g", 1)
	_ = c.Disconnect(&paho.Disconnect{})
	// w1 subscribes on b1 and goes away; removed meanwhile.
	w := dial(b1, "w1", true)
	w.Sub(t, "groups/g", 1)
	_ = w.Disconnect(&paho.Disconnect{})
	api.waitPresence("w1", false, "b1")
	api.expect(http.MethodDelete, "/v1/groups/g/members/w1", nil, http.StatusNoContent, nil)

	c = dial(b0, "m1", false)
	testutil.WaitFor(t, waitCond, func() error {
		if s := b0.Stats(); s.Groups == nil || s.Groups.Devices == 0 {
			return fmt.Errorf("b0 has not read m1's memberships: %+v", s.Groups)
		}
		return nil
	})
	waitRoutes(t, b1, "b0", 1) // the push API may be connected to b1
	var pub pushapi.Published
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "moved"}, http.StatusOK, &pub)
	if got := nextOn(t, c, "groups/g"); string(got.Payload) != "moved" || messageID(got) != pub.ID {
		t.Fatalf("m1 on b0 got %q", got.Payload)
	}
	w = dial(b1, "w1", false)
	api.expect(http.MethodPost, "/v1/groups/g/messages", map[string]any{"payload": "after"}, http.StatusOK, nil)
	nextOn(t, c, "groups/g")
	w.None(t, 300*time.Millisecond)
}
