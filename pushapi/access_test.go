package pushapi_test

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

var connectsRE = regexp.MustCompile(`(?m)^rtm_pushapi_broker_connects_total (\d+)$`)

// TestServiceTokenRenewal: the push API replaces its broker connection
// before its service token expires (brokers close a connection when its
// token expires, 0xA0), without failing a request: publishes streamed
// across two renewals are all answered 200 and all delivered, and no
// broker had to close the connection.
func TestServiceTokenRenewal(t *testing.T) {
	t.Parallel()
	const (
		ttl        = 9 * time.Second // renewed 3 s before it expires
		publishers = 3
		pace       = 5 * time.Millisecond
	)
	st := storetest.Open(t)
	bs := startCluster(t, 1, st)
	api := startAPI(t, bs[0].GossipAddr(), st, func(o *pushapi.Options) { o.ServiceTokenTTL = ttl })
	api.waitBroker()
	sub := testutil.MustV5(t, bs[0].Addr(broker.ListenerTCP), "renew-sub")
	sub.Sub(t, "renew/#", 1)
	connects := func() int {
		r := api.do(http.MethodGet, "/metrics", nil)
		m := connectsRE.FindSubmatch(r.body)
		if r.status != http.StatusOK || m == nil {
			t.Errorf("GET /metrics: %d, no connects counter", r.status)
			return 0
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}

	var (
		stop   atomic.Bool
		wg     sync.WaitGroup
		mu     sync.Mutex
		ids    = map[string]bool{}
		failed []string
	)
	for g := range publishers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(pace)
			defer tick.Stop()
			for i := 0; !stop.Load(); i++ {
				<-tick.C
				r := api.rawNoFatal(http.MethodPost, "/v1/messages", map[string]any{"topic": fmt.Sprintf("renew/%d", g), "payload": fmt.Sprint(i), "qos": 1})
				var p pushapi.Published
				mu.Lock()
				if r.status != http.StatusOK || jsonUnmarshal(r.body, &p) != nil {
					failed = append(failed, r.String())
				} else {
					ids[p.ID] = true
				}
				mu.Unlock()
			}
		}()
	}
	// Two renewals: three connections.
	testutil.WaitFor(t, 4*ttl+waitCond, func() error {
		if n := connects(); n < 3 {
			return fmt.Errorf("%d broker connections, want 3", n)
		}
		return nil
	})
	stop.Store(true)
	wg.Wait()
	if len(failed) > 0 {
		t.Fatalf("%d of %d requests failed across the renewals, first: %s", len(failed), len(failed)+len(ids), failed[0])
	}
	for len(ids) > 0 {
		select {
		case m := <-sub.Messages:
			delete(ids, messageID(m))
		case <-time.After(waitMsg):
			t.Fatalf("%d acknowledged messages not delivered", len(ids))
		}
	}
	if api.logs.Contains("broker disconnected the push API", "reason_code=0xA0") {
		t.Error("a broker closed the push API's connection for an expired token: not renewed in time")
	}
	if !api.logs.Contains("service token renewed") {
		t.Error("no renewal logged")
	}
}
