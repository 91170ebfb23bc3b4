package store

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/oklog/ulid/v2"
	"go.mongodb.org/mongo-driver/v2/bson"
)

// BenchmarkInsertHistory is the writer's insert path against the store at
// RTM_BENCH_STORE_URI (e.g. `rtm store` pinned to another core, so that
// the profile and cpu-µs/msg are the writer's alone).
func BenchmarkInsertHistory(b *testing.B) {
	uri := os.Getenv("RTM_BENCH_STORE_URI")
	if uri == "" {
		b.Skip("RTM_BENCH_STORE_URI not set")
	}
	for _, size := range []int{1024, 4096} { // 4096: history.batch_size since session 10
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			ctx := context.Background()
			st, err := Open(ctx, Options{URI: uri, Database: fmt.Sprintf("bench_insert_go_%d", size)})
			if err != nil {
				b.Fatal(err)
			}
			defer func() { _ = st.DB().Drop(ctx); _ = st.Close(ctx) }()
			_ = st.DB().Drop(ctx)
			payload := make([]byte, 64)
			now := time.Now().UTC().Truncate(time.Millisecond)
			batch := func() []HistoryMessage {
				out := make([]HistoryMessage, size)
				for i := range out {
					out[i] = HistoryMessage{ID: ulid.Make().String(), Topic: "bench/t", Payload: payload, QoS: 1,
						Publisher: fmt.Sprintf("on-%d-1234567890", i%16), Node: "on", Time: now}
				}
				return out
			}
			batches := make([][]HistoryMessage, b.N+1)
			for i := range batches {
				batches[i] = batch()
			}
			if err := st.InsertHistory(ctx, batches[b.N]); err != nil {
				b.Fatal(err)
			}
			var ru0, ru1 syscall.Rusage
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := st.InsertHistory(ctx, batches[i]); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
			cpu := ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano()
			b.ReportMetric(float64(cpu)/1e3/float64(b.N*size), "cpu-µs/msg")
			b.ReportMetric(float64(ru1.Stime.Nano()-ru0.Stime.Nano())/1e3/float64(b.N*size), "sys-µs/msg")
		})
	}
}

// BenchmarkAppendHistoryBSON is the encoding of each captured message,
// once for its bucket (and once more for the spool when it spills).
func BenchmarkAppendHistoryBSON(b *testing.B) {
	m := HistoryMessage{ID: ulid.Make().String(), Topic: "devices/d42/inbox", Payload: make([]byte, 64), QoS: 1,
		Publisher: "on-7-1234567890", Node: "on", Time: time.Now()}
	var buf []byte
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		buf = AppendHistoryBSON(buf[:0], &m)
	}
}

// BenchmarkDriverMarshalOfABucket is what the driver's InsertMany does to
// each document before it copies it into its wire message (mongo.marshal:
// an Encoder on a fresh bytes.Buffer): for a bucket of 1,024 messages,
// what inserting documents without it (a pooled document handed to the
// driver as is) would save the writer.
func BenchmarkDriverMarshalOfABucket(b *testing.B) {
	msgs := make([]HistoryMessage, 1024)
	for i := range msgs {
		msgs[i] = HistoryMessage{ID: ulid.Make().String(), Topic: "bench/t", Payload: make([]byte, 64), QoS: 1,
			Publisher: fmt.Sprintf("on-%d-1234567890", i%16), Node: "on", Time: time.Now()}
	}
	bks, data := packBuckets(msgs, nil)
	doc := appendBucketBSON(nil, &histBucket{ID: "bon|1", Node: "on", Count: len(msgs), T0: bks[0].t0, T1: bks[0].t1, Data: data})
	b.ReportAllocs()
	b.SetBytes(int64(len(doc)))
	for b.Loop() {
		var buf bytes.Buffer
		if err := bson.NewEncoder(bson.NewDocumentWriter(&buf)).Encode(bson.Raw(doc)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/1e3/float64(b.N*len(msgs)), "µs/msg")
}
