package pushapi_test

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

var connectsRE = regexp.MustCompile(`(?m)^rtm_pushapi_broker_connects_total (\d+)$`)

// TestServiceTokenExpiry: the broker closes the push API's connection when
// its service token expires (DISCONNECT 0xA0), and the push API connects
// again with a fresh token: publishes succeed (and are delivered) after
// each expiry.
func TestServiceTokenExpiry(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	bs := startCluster(t, 1, st)
	api := startAPI(t, bs[0].GossipAddr(), st, func(o *pushapi.Options) { o.ServiceTokenTTL = 2 * time.Second })
	api.waitBroker()
	sub := testutil.MustV5(t, bs[0].Addr(broker.ListenerTCP), "exp-sub")
	sub.Sub(t, "exp/#", 1)
	connects := func() int {
		r := api.do(http.MethodGet, "/metrics", nil)
		m := connectsRE.FindSubmatch(r.body)
		if r.status != http.StatusOK || m == nil {
			t.Fatalf("GET /metrics: %d, no connects counter", r.status)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	for round := 2; round <= 3; round++ {
		// A token of 2 s (whole seconds: it expires 1 to 2 s after it was
		// issued) is disconnected within a few seconds, and replaced.
		testutil.WaitFor(t, waitCond, func() error {
			if n := connects(); n < round {
				return fmt.Errorf("%d broker connections, want %d", n, round)
			}
			return nil
		})
		api.waitBroker()
		p := api.publish(map[string]any{"topic": "exp/a", "payload": "after expiry", "qos": 1})
		if m := nextOn(t, sub, "exp/a"); messageID(m) != p.ID {
			t.Fatalf("connection %d: got message %s, want %s", round, messageID(m), p.ID)
		}
	}
	if !api.logs.Contains("broker disconnected the push API", "reason_code=0xA0", "token expired") {
		t.Fatal("no DISCONNECT 0xA0 (token expired) logged")
	}
}
