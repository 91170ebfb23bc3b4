package store_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

// fieldSamples set every field of a message, and leave the optional ones
// unset.
func fieldSamples() []store.HistoryMessage {
	return []store.HistoryMessage{
		{Topic: "push/news", Payload: []byte("hello"), QoS: 1, Retain: true, Publisher: "api-key", Node: "n1",
			ContentType: "text/plain", User: []store.UserProperty{{Key: "a", Value: "1"}, {Key: "a", Value: "2"}, {Key: "", Value: ""}}},
		{Topic: "groups/g", Payload: []byte{0, 0xff, 0x80}, QoS: 0, Publisher: "dev", Node: "n2"},
		{Topic: "devices/d/inbox", Payload: []byte{}, QoS: 2, Publisher: "dev2", Node: "n1"},
	}
}

// Every field written by the hand-made encoding (a bucket on FerretDB, a
// document per message on MongoDB) reads back as it was captured.
func TestHistoryFieldsRoundTripThroughTheStore(t *testing.T) {
	for _, perMessage := range []bool{false, true} {
		t.Run(map[bool]string{false: "buckets", true: "per-message"}[perMessage], func(t *testing.T) {
			s := storetest.Open(t)
			if perMessage {
				s.WriteHistoryPerMessage()
			}
			ctx := context.Background()
			at := time.Now().UTC().Truncate(time.Millisecond)
			var msgs []store.HistoryMessage
			for i, m := range fieldSamples() {
				m.ID = ulid.MustNew(ulid.Timestamp(at), ulid.DefaultEntropy()).String()
				m.Time = at.Add(time.Duration(i) * time.Millisecond)
				msgs = append(msgs, m)
			}
			if err := s.InsertHistory(ctx, msgs); err != nil {
				t.Fatal(err)
			}
			for _, m := range msgs {
				got, err := s.HistoryByID(ctx, m.ID)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, m) {
					t.Fatalf("read back\n %#v\nwant\n %#v", got, m)
				}
				page, err := s.History(ctx, store.HistoryQuery{Topic: m.Topic, Limit: 10})
				if err != nil || len(page) != 1 || !reflect.DeepEqual(page[0], m) {
					t.Fatalf("page of %s: %#v %v", m.Topic, page, err)
				}
			}
		})
	}
}
