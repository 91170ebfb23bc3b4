package store_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

func histMsg(topic string, at time.Time) store.HistoryMessage {
	return store.HistoryMessage{ID: ulid.MustNew(ulid.Timestamp(at), ulid.DefaultEntropy()).String(), Topic: topic,
		Payload: []byte("p"), QoS: 1, Publisher: "c", Node: "n", Time: at.UTC().Truncate(time.Millisecond)}
}

// Writing a batch again (a retry, a replayed spool) stores each message
// once; pages come newest first within their bounds.
func TestHistoryInsertIsIdempotentAndPagesNewestFirst(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	base := time.Now().Add(-time.Hour)
	var msgs []store.HistoryMessage
	for i := range 20 {
		msgs = append(msgs, histMsg(fmt.Sprintf("t/%d", i%2), base.Add(time.Duration(i)*time.Second)))
	}
	if err := s.InsertHistory(ctx, msgs[:15]); err != nil {
		t.Fatal(err)
	}
	if err := s.InsertHistory(ctx, msgs); err != nil { // 15 duplicates
		t.Fatalf("insert with duplicates: %v", err)
	}
	all, err := s.AllHistory(ctx)
	if err != nil || len(all) != 20 {
		t.Fatalf("count = %d, %v; want 20", len(all), err)
	}
	page, err := s.History(ctx, store.HistoryQuery{Topic: "t/0", Limit: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != 3 || page[0].ID != msgs[18].ID || page[1].ID != msgs[16].ID || page[2].ID != msgs[14].ID {
		t.Fatalf("page = %v", page)
	}
	page, err = s.History(ctx, store.HistoryQuery{Topic: "t/0", Before: msgs[14].ID, After: msgs[8].ID, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != 2 || page[0].ID != msgs[12].ID || page[1].ID != msgs[10].ID {
		t.Fatalf("bounded page = %v", page)
	}
	got, err := s.HistoryByID(ctx, msgs[3].ID)
	if err != nil || got.Topic != "t/1" || string(got.Payload) != "p" || !got.Time.Equal(msgs[3].Time) {
		t.Fatalf("by id: %+v %v", got, err)
	}
	if _, err := s.HistoryByID(ctx, "nope"); err != store.ErrNotFound {
		t.Fatalf("unknown id: %v", err)
	}
}

// The retention purge deletes what is older than the cutoff, only.
func TestHistoryPurgeRemovesOldMessagesOnly(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	now := time.Now()
	old := []store.HistoryMessage{histMsg("a", now.Add(-48*time.Hour)), histMsg("b", now.Add(-25*time.Hour))}
	young := []store.HistoryMessage{histMsg("a", now.Add(-23*time.Hour)), histMsg("b", now)}
	if err := s.InsertHistory(ctx, append(old, young...)); err != nil {
		t.Fatal(err)
	}
	gaps := []store.HistoryGap{
		{ID: "g1", Filter: "a", From: now.Add(-50 * time.Hour), To: now.Add(-49 * time.Hour), Count: 3},
		{ID: "g2", Filter: "a", From: now.Add(-2 * time.Hour), To: now.Add(-time.Hour), Count: 4},
	}
	if err := s.InsertHistoryGaps(ctx, gaps); err != nil {
		t.Fatal(err)
	}
	n, err := s.PurgeHistory(ctx, now.Add(-24*time.Hour))
	if err != nil || n != 2 {
		t.Fatalf("purged %d, %v; want the 2 old ones", n, err)
	}
	for _, m := range old {
		if _, err := s.HistoryByID(ctx, m.ID); err != store.ErrNotFound {
			t.Fatalf("old message %s still there", m.ID)
		}
	}
	for _, m := range young {
		if _, err := s.HistoryByID(ctx, m.ID); err != nil {
			t.Fatalf("young message %s: %v", m.ID, err)
		}
	}
	left, err := s.HistoryGaps(ctx, time.Time{}, time.Time{})
	if err != nil || len(left) != 1 || left[0].ID != "g2" {
		t.Fatalf("gaps after purge: %v %v", left, err)
	}
}

// The TTL index is created where the server has them, and its absence
// (FerretDB v1) is reported, not an error.
func TestHistoryTTLIndexWhereSupported(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	ok, err := s.EnsureHistoryTTL(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var bi bson.M
	if err := s.DB().RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&bi); err != nil {
		t.Fatal(err)
	}
	_, ferret := bi["ferretdbVersion"]
	if ok == ferret {
		t.Fatalf("TTL index reported %v on a server that is FerretDB: %v", ok, ferret)
	}
	if ok {
		// Again with another expiry: changed, not refused.
		if _, err := s.EnsureHistoryTTL(ctx, 2*time.Hour); err != nil {
			t.Fatal(err)
		}
	}
}

// A page reads the index topic_id_desc, not the topic, where the server
// explains its plans (MongoDB); FerretDB v1 pushes no filter on topic down
// (docs/history.md says so), which its explain reports.
func TestHistoryPageUsesTheIndex(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	if err := s.InsertHistory(ctx, []store.HistoryMessage{histMsg("a", time.Now()), histMsg("b", time.Now())}); err != nil {
		t.Fatal(err)
	}
	q := store.HistoryQuery{Topic: "a", Before: "7ZZZZZZZZZZZZZZZZZZZZZZZZZ", Limit: 50}
	var ex bson.M
	err := s.DB().RunCommand(ctx, bson.D{{Key: "explain", Value: bson.D{{Key: "find", Value: store.CollHistory},
		{Key: "filter", Value: store.HistoryFilter(q)}, {Key: "sort", Value: bson.D{{Key: "_id", Value: -1}}},
		{Key: "limit", Value: int64(50)}}}}).Decode(&ex)
	if err != nil {
		t.Fatal(err)
	}
	if _, ferret := ex["filterPushdown"]; ferret {
		t.Logf("FerretDB: filterPushdown=%v sortPushdown=%v (no index on topic)", ex["filterPushdown"], ex["sortPushdown"])
		return
	}
	plan := fmt.Sprint(ex["queryPlanner"])
	if !strings.Contains(plan, "topic_id_desc") || strings.Contains(plan, "COLLSCAN") {
		t.Fatalf("the page's plan does not use topic_id_desc: %s", plan)
	}
}
