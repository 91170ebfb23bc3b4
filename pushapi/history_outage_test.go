package pushapi_test

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

// proxiedStore is the test's database reached through a TCP proxy the test
// can close: the broker's store, while the push API reads the database
// directly.
func proxiedStore(t *testing.T, st *store.Store) (*store.Store, *testutil.TCPProxy, string) {
	t.Helper()
	u, err := url.Parse(storetest.URI(t))
	if err != nil {
		t.Fatal(err)
	}
	target := u.Host
	px := testutil.NewTCPProxy(t)
	px.SetTarget(target)
	ctx := testutil.Context(t, waitCond)
	bst, err := store.Open(ctx, store.Options{URI: "mongodb://" + px.Addr() + "/?serverSelectionTimeoutMS=2000&connectTimeoutMS=2000",
		Database: st.DB().Name(), ConnectTimeout: waitCond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = bst.Close(ctx)
	})
	return bst, px, target
}

// waitWritten waits until b has written n history messages to the store.
func waitWritten(t *testing.T, b *broker.Broker, n int64) {
	t.Helper()
	testutil.WaitFor(t, 6*waitCond, func() error {
		if h := b.Stats().History; h.Written != n || h.Queued != 0 || h.SpoolMessages != 0 {
			return fmt.Errorf("history: %d written (want %d), %d queued, %d spooled", h.Written, n, h.Queued, h.SpoolMessages)
		}
		return nil
	})
}

// storeDown closes the proxy: connections are cut and new ones refused.
func storeDown(px *testutil.TCPProxy) { px.SetTarget(""); px.Cut() }

// publishRun publishes n QoS 1 messages to topic from 4 clients at once
// and returns each publish's latency (PUBACK included).
func publishRun(t *testing.T, addr, topic string, n int) []time.Duration {
	t.Helper()
	const clients = 4
	var (
		mu   sync.Mutex
		lats []time.Duration
		wg   sync.WaitGroup
	)
	errs := make(chan error, clients)
	for c := range clients {
		cl := testutil.MustV5(t, addr, fmt.Sprintf("%s-pub%d", strings.ReplaceAll(topic, "/", "-"), c))
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, n/clients)
			for i := range n / clients {
				start := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
				_, err := cl.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(fmt.Sprintf("%d:%d", c, i))})
				cancel()
				if err != nil {
					errs <- err
					return
				}
				local = append(local, time.Since(start))
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("publish to %s: %v", topic, err)
	}
	return lats
}

func p99(lats []time.Duration) time.Duration {
	s := slices.Clone(lats)
	slices.Sort(s)
	return s[len(s)*99/100]
}

// walkHistory returns every message of topic through the API, newest
// first.
func walkHistory(t *testing.T, api *testAPI, topic string) ([]pushapi.StoredMessage, []pushapi.HistoryGap) {
	t.Helper()
	var all []pushapi.StoredMessage
	var gaps []pushapi.HistoryGap
	next := "/v1/history?limit=1000&topic=" + url.QueryEscape(topic)
	for {
		var p pushapi.HistoryPage
		api.expect("GET", next, nil, 200, &p)
		all = append(all, p.Messages...)
		gaps = append(gaps, p.Gaps...)
		if p.NextCursor == nil {
			return all, gaps
		}
		next = "/v1/history?limit=1000&cursor=" + url.QueryEscape(*p.NextCursor)
	}
}

// storedNewestFirst reads a topic's history from the store directly: on
// the embedded store a page scans the collection (docs/history.md), too
// slow for the API's 5 s store timeout under -race with 10,000 messages.
func storedNewestFirst(t *testing.T, st *store.Store, topic string) []store.HistoryMessage {
	t.Helper()
	ctx := testutil.Context(t, 2*time.Minute)
	msgs, err := st.History(ctx, store.HistoryQuery{Topic: topic, Limit: 100000})
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

// checkOrder fails unless msgs (newest first) hold each client's payloads
// "c:i" for i from n-1 down to 0, exactly once each.
func checkOrder(t *testing.T, msgs []store.HistoryMessage, clients, per int) {
	t.Helper()
	next := make([]int, clients)
	for c := range next {
		next[c] = per - 1
	}
	for _, m := range msgs {
		c, i, _ := strings.Cut(string(m.Payload), ":")
		ci, _ := strconv.Atoi(c)
		ii, _ := strconv.Atoi(i)
		if ci < 0 || ci >= clients || ii != next[ci] {
			var seqs []string
			for _, m := range msgs {
				if strings.HasPrefix(string(m.Payload), c+":") {
					seqs = append(seqs, string(m.Payload)+"/"+m.ID[:12]+"/"+m.Time.Format("05.000"))
				}
			}
			t.Logf("client %s: %d messages: %v", c, len(seqs), seqs[max(0, len(seqs)-60):])
			t.Fatalf("message %q out of order or twice: want %d:%d next", m.Payload, ci, next[ci])
		}
		next[ci]--
	}
	for c, n := range next {
		if n != -1 {
			t.Fatalf("client %d: messages 0..%d missing", c, n)
		}
	}
}

// While the store is unreachable the broker keeps acknowledging at the
// same pace (p99 against the same run with the store up) and spools what
// it captures; once the store is back, all 5,000 messages are in history,
// in order, none dropped.
func TestHistoryStoreOutageLosesNothing(t *testing.T) {
	st := storetest.Open(t)
	bst, px, target := proxiedStore(t, st)
	b := startBroker(t, "b0", "", bst, func(o *broker.Options) {
		historyOn(t)(o)
		o.History.QueueLen = 200
	})
	addr := b.Addr(broker.ListenerTCP)
	// 5,000 messages; 2,000 under the race detector, which makes the
	// in-process embedded store some 30 times slower (its inserts, not the
	// broker, would take most of the test's time).
	n := 5000
	if raceScale > 1 {
		n = 2000
	}

	t0 := time.Now()
	base := publishRun(t, addr, "chat/up", n)
	t.Logf("run 1: %v", time.Since(t0))
	// Written counts inserts the store acknowledged (counting documents
	// would scan the collection on the embedded store).
	waitWritten(t, b, int64(n))

	t.Logf("stored: %v", time.Since(t0))
	storeDown(px)
	out := publishRun(t, addr, "chat/down", n)
	t.Logf("run 2: %v", time.Since(t0))
	h := b.Stats().History
	if h.SpoolMessages == 0 || h.SpoolBytes == 0 {
		t.Fatalf("nothing spooled during the outage: %+v", h)
	}
	if h.Written != int64(n) {
		t.Fatalf("%d written during the outage: the store was not cut off", h.Written-int64(n))
	}
	pb, po := p99(base), p99(out)
	t.Logf("publish p99: store up %v, store down %v (ratio %.2f); spooled %d messages, %d bytes", pb, po, float64(po)/float64(pb), h.SpoolMessages, h.SpoolBytes)
	if limit := 10 * max(pb, 2*time.Millisecond); po > limit {
		t.Fatalf("publish p99 %v during the outage, more than 10× the %v without it", po, pb)
	}

	px.SetTarget(target)
	waitWritten(t, b, int64(2*n))
	t.Logf("stored after the outage: %v", time.Since(t0))
	checkOrder(t, storedNewestFirst(t, st, "chat/down"), 4, n/4)
	if gaps, err := st.HistoryGaps(testutil.Context(t, waitCond), time.Time{}, time.Time{}); err != nil || len(gaps) != 0 {
		t.Fatalf("gaps %v (%v) though nothing was dropped", gaps, err)
	}
	t.Logf("checked order: %v", time.Since(t0))
	if h := b.Stats().History; h.Dropped != 0 || h.SpoolMessages != 0 || h.Written != int64(2*n) {
		t.Fatalf("after the outage: %+v, want 0 dropped, 0 spooled, %d written", h, 2*n)
	}
}

// A spool that fills drops what does not fit, counts it exactly, and the
// gap is recorded once the store is back: a query over the range says how
// many messages of which filter are missing, and when.
func TestHistorySpoolFullIsCountedAndShownAsAGap(t *testing.T) {
	st := storetest.Open(t)
	bst, px, target := proxiedStore(t, st)
	b := startBroker(t, "b0", "", bst, func(o *broker.Options) {
		historyOn(t)(o)
		o.History.QueueLen = 20
		o.History.SpoolMaxBytes = 16 << 10
	})
	api := startAPI(t, b.GossipAddr(), st, nil)
	storeDown(px)
	from := time.Now()
	const n = 600
	publishRun(t, b.Addr(broker.ListenerTCP), "chat/full", n)
	to := time.Now()
	dropped := b.Stats().History.Dropped
	if dropped == 0 || dropped >= n {
		t.Fatalf("%d of %d dropped: want the spool to hold some and drop the rest", dropped, n)
	}
	px.SetTarget(target)
	var msgs []pushapi.StoredMessage
	var gaps []pushapi.HistoryGap
	testutil.WaitFor(t, 3*waitCond, func() error {
		msgs, gaps = walkHistory(t, api, "chat/full")
		if int64(len(msgs)) != n-dropped || len(gaps) == 0 {
			return fmt.Errorf("%d stored (want %d), gaps %v", len(msgs), n-dropped, gaps)
		}
		return nil
	})
	if d := b.Stats().History.Dropped; d != dropped {
		t.Fatalf("dropped %d after the outage, %d during it", d, dropped)
	}
	var count int64
	for _, g := range gaps {
		count += g.Count
		if g.Filter != "chat/#" || g.Reason != "spool_full" || g.Node != "b0" ||
			g.From.Before(from.Add(-time.Second)) || g.To.After(to.Add(time.Second)) || g.To.Before(g.From) {
			t.Fatalf("gap %+v: want filter chat/#, spool_full, b0, within [%v, %v]", g, from, to)
		}
	}
	if count != dropped {
		t.Fatalf("gaps count %d messages, %d were dropped", count, dropped)
	}
	// A range with no drop in it answers no gap.
	var p pushapi.HistoryPage
	api.expect("GET", "/v1/history?topic=chat/full&before="+url.QueryEscape(from.Add(-time.Minute).Format(time.RFC3339Nano)), nil, 200, &p)
	if len(p.Gaps) != 0 {
		t.Fatalf("gaps %v before the outage", p.Gaps)
	}
}

// A graceful shutdown while the store hangs ends within
// history.flush_timeout, and what it could not write is in the spool: the
// next broker on the same data directory writes it, each message once.
func TestHistoryShutdownIsBoundedAndKeepsTheRest(t *testing.T) {
	st := storetest.Open(t)
	bst, px, _ := proxiedStore(t, st)
	dir := t.TempDir()
	opts := func(o *broker.Options) {
		historyOn(t)(o)
		o.DataDir = dir
		o.History.FlushTimeout = time.Second
	}
	b := startBroker(t, "b0", "", bst, opts)
	const n = 300
	// The store accepts connections but answers nothing.
	px.Hold(testutil.FromTarget)
	publishRun(t, b.Addr(broker.ListenerTCP), "chat/bye", n)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("shutdown took %v with history.flush_timeout 1s", el)
	}
	px.Cut() // releases what was held, and the hung inserts fail

	b2 := startBroker(t, "b0", "", st, opts)
	waitWritten(t, b2, n)
	msgs := storedNewestFirst(t, st, "chat/bye")
	if len(msgs) != n {
		t.Fatalf("%d stored, want %d", len(msgs), n)
	}
	checkOrder(t, msgs, 4, n/4)
}
