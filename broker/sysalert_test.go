package broker_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestSysAlertsFromTheAdminAPI: POST /v1/sys/alerts publishes its JSON body
// on $SYS/rtm/alerts to the node's subscribers allowed to read it (no MQTT
// client may publish to $SYS), and refuses a body that is not JSON.
func TestSysAlertsFromTheAdminAPI(t *testing.T) {
	b := testcluster.Broker(t, "sys1", "", func(o *broker.Options) { o.Auth.ACL = "allow sub $SYS/rtm/alerts" })
	sub := testutil.MustV5(t, b.Addr(broker.ListenerTCP), "alerts-reader")
	sub.Sub(t, broker.SysAlertsTopic, 1)
	code, _ := adminDo(t, b, http.MethodPost, "/v1/sys/alerts", `{"event":"firing","rule":"node_down","node":"n3"}`)
	if code != http.StatusOK {
		t.Fatalf("POST /v1/sys/alerts: %d", code)
	}
	m := sub.Next(t, 10*time.Second)
	if m.Topic != broker.SysAlertsTopic || string(m.Payload) != `{"event":"firing","rule":"node_down","node":"n3"}` {
		t.Fatalf("got %s %q", m.Topic, m.Payload)
	}
	if code, body := adminDo(t, b, http.MethodPost, "/v1/sys/alerts", `not json`); code != http.StatusBadRequest || body["error"] != "bad_request" {
		t.Fatalf("non-JSON body: %d %v, want 400 bad_request", code, body)
	}
	sub.None(t, 300*time.Millisecond)
	// Without the admin key: 401, nothing published.
	res, err := http.Post("http://"+b.Addr(broker.ListenerAdmin)+"/v1/sys/alerts", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without the admin key: %d, want 401", res.StatusCode)
	}
}
