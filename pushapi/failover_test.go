package pushapi_test

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestFailover streams publishes from several clients while the broker the
// push API is connected to shuts down. Every request is answered within
// the publish timeout plus a margin, either 200 (and that message, by its
// id, reaches the subscriber on the surviving broker) or 503
// broker_unavailable; then publishes succeed again through the survivor.
func TestFailover(t *testing.T) {
	t.Parallel()
	const (
		publishTimeout = 2 * time.Second
		margin         = time.Second
		publishers     = 4
		minRequests    = 200
		afterFailover  = 40 // successes needed after the broker is gone
		maxRequests    = 20000
		pace           = 2 * time.Millisecond // per publisher: bounded load
	)
	st := storetest.Open(t)
	bs := startCluster(t, 2, st)
	api := startAPI(t, bs[0].GossipAddr(), st, func(o *pushapi.Options) { o.Config.PublishTimeout = publishTimeout })
	doomed := byName(bs, api.waitBroker())
	survivor := other(bs, doomed.Name())
	sub := testutil.MustV5(t, survivor.Addr(broker.ListenerTCP), "survivor-sub")
	sub.Sub(t, "fo/#", 1)
	waitRoutes(t, doomed, survivor.Name(), 1)

	type result struct {
		status int
		code   string
		id     string
		took   time.Duration
		after  bool // sent after the shutdown completed
	}
	var (
		mu       sync.Mutex
		results  []result
		sent     atomic.Int64
		gone     atomic.Bool // the doomed broker has shut down
		okAfter  atomic.Int64
		shutdown = make(chan time.Duration, 1)
		wg       sync.WaitGroup
	)
	done := func() bool {
		n := sent.Load()
		return n >= maxRequests || (n >= minRequests && gone.Load() && okAfter.Load() >= afterFailover)
	}
	for g := range publishers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(pace)
			defer tick.Stop()
			for !done() {
				<-tick.C
				n := sent.Add(1)
				after := gone.Load()
				start := time.Now()
				r := api.rawNoFatal(http.MethodPost, "/v1/messages", map[string]any{"topic": fmt.Sprintf("fo/%d", g), "payload": fmt.Sprint(n)})
				res := result{status: r.status, took: time.Since(start), after: after}
				switch r.status {
				case http.StatusOK:
					var p pushapi.Published
					if err := jsonUnmarshal(r.body, &p); err == nil {
						res.id = p.ID
					}
					if after {
						okAfter.Add(1)
					}
				default:
					var e pushapi.ErrorBody
					_ = jsonUnmarshal(r.body, &e)
					res.code = e.Error.Code
				}
				mu.Lock()
				results = append(results, res)
				mu.Unlock()
			}
		}()
	}
	// Shut the push API's broker down once the stream is flowing.
	testutil.WaitFor(t, waitCond, func() error {
		if n := sent.Load(); n < minRequests/4 {
			return fmt.Errorf("%d requests sent", n)
		}
		return nil
	})
	go func() {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := doomed.Shutdown(ctx); err != nil {
			t.Errorf("shutdown %s: %v", doomed.Name(), err)
		}
		gone.Store(true)
		shutdown <- time.Since(start)
	}()
	wg.Wait()
	took := <-shutdown

	var ok, unavailable int
	want := map[string]bool{}
	for i, r := range results {
		if r.took > publishTimeout+margin {
			t.Errorf("request %d answered after %v, more than the publish timeout %v + %v", i, r.took, publishTimeout, margin)
		}
		switch {
		case r.status == http.StatusOK && r.id != "":
			ok++
			want[r.id] = true
		case r.status == http.StatusServiceUnavailable && r.code == pushapi.CodeBrokerUnavailable:
			unavailable++
		default:
			t.Errorf("request %d: status %d code %q, want 200 or 503 broker_unavailable", i, r.status, r.code)
		}
	}
	t.Logf("%d requests: %d published, %d unavailable; %s shut down in %v; now on %s",
		len(results), ok, unavailable, doomed.Name(), took, api.Broker())

	// Every acknowledged message reached the survivor's subscriber.
	deadline := time.After(waitMsg)
	for len(want) > 0 {
		select {
		case m := <-sub.Messages:
			delete(want, messageID(m))
		case <-deadline:
			t.Fatalf("%d acknowledged messages never reached %s's subscriber (of %d)", len(want), survivor.Name(), ok)
		}
	}
	if got := api.Broker(); got != survivor.Name() {
		t.Fatalf("push API on %q, want %s", got, survivor.Name())
	}
	p := api.publish(map[string]any{"topic": "fo/end", "payload": "end"})
	if m := nextOn(t, sub, "fo/end"); messageID(m) != p.ID {
		t.Fatalf("after failover: got %s, want %s", messageID(m), p.ID)
	}
}
