package pushapi_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/plugins/token"
	"github.com/rtm-dev/rtm/pushapi"
)

// answerWindow is how long a request must stay unanswered while the broker
// holds its acknowledgement. Asserting an absence needs a window.
const answerWindow = 200 * time.Millisecond

// slack is what a request may take beyond the publish timeout: HTTP, JSON
// and scheduling, slower under the race detector.
const slack = time.Second * (raceScale + 2) / 3

// TestPublishWaitsForAcknowledgement drives the push API against a scripted
// broker: the answer comes only after the PUBACK, carries the id the
// message had on the wire, and every failure (refusal, lost connection,
// timeout, oversized packet) is the documented error, in time.
func TestPublishWaitsForAcknowledgement(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	fake := startFakeBroker(t, "fake")
	fake.mu.Lock()
	fake.maxPacket = 64 << 10
	fake.mu.Unlock()
	// Long enough that a loaded -race run never reaches it in the
	// subtests that release the PUBACK (it did at 750 ms), short enough to
	// wait out once in the timeout subtest.
	const timeout = 3 * time.Second
	api := startAPI(t, fake.node.Addr(), st, func(o *pushapi.Options) { o.Config.PublishTimeout = timeout })

	// The connection: clean start, no session expiry, the push API's name
	// as client ID and username, a service token as password.
	c := fake.nextConnect(t)
	claims, err := mustSigner(t).Verify(string(c.Password), time.Now())
	if err != nil || !claims.Service || claims.ClientID != "api1" {
		t.Fatalf("password is not a service token for api1: %+v, %v", claims, err)
	}
	if c.ClientID != "api1" || c.Username != "api1" || !c.CleanStart || c.ProtocolVersion != 5 ||
		(c.Properties != nil && c.Properties.SessionExpiryInterval != nil && *c.Properties.SessionExpiryInterval != 0) {
		t.Fatalf("CONNECT %v, want client ID and username api1, clean start, MQTT 5, session expiry 0", c)
	}
	api.waitBroker()

	t.Run("answer after PUBACK", func(t *testing.T) {
		api := api.in(t)
		fake.set(true, 0)
		ch := async(api, http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x"})
		p := fake.nextPublish(t)
		time.Sleep(answerWindow) // the window in which no answer may come
		pending(t, ch, "publish before its PUBACK")
		fake.release()
		r := waitAnswer(t, ch)
		var pub pushapi.Published
		r.decode(t, &pub)
		if r.status != http.StatusOK || pub.ID != p.Properties.User[0].Value || p.Properties.User[0].Key != "rtm-message-id" || p.QoS != 1 {
			t.Fatalf("answer %s for PUBLISH %v, want 200 with the id of the rtm-message-id property", r.response, p)
		}
	})

	t.Run("QoS 0 needs no acknowledgement", func(t *testing.T) {
		api := api.in(t)
		fake.set(true, 0)
		api.publish(map[string]any{"topic": "a/b", "payload": "x", "qos": 0})
		if p := fake.nextPublish(t); p.QoS != 0 {
			t.Fatalf("QoS %d on the wire", p.QoS)
		}
		fake.release()
	})

	t.Run("refused", func(t *testing.T) {
		api := api.in(t)
		fake.set(false, 0x87)
		e := api.expectError(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x"}, http.StatusBadGateway, pushapi.CodePublishRejected)
		if !strings.Contains(e.Message, "0x87") {
			t.Errorf("message %q does not name the reason code 0x87", e.Message)
		}
		fake.nextPublish(t)
		fake.set(false, 0x97) // quota exceeded: try again later
		api.expectError(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x", "qos": 2}, http.StatusServiceUnavailable, pushapi.CodeBrokerUnavailable)
		fake.nextPublish(t)
		fake.set(false, 0)
	})

	t.Run("timeout", func(t *testing.T) {
		api := api.in(t)
		fake.set(true, 0)
		r := waitAnswer(t, async(api, http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x"}))
		if r.status != http.StatusServiceUnavailable || r.apiError(t).Code != pushapi.CodeBrokerUnavailable {
			t.Fatalf("unacknowledged publish: %s, want 503 broker_unavailable", r.response)
		}
		if r.took < timeout || r.took > timeout+slack {
			t.Errorf("answered after %v, want the publish timeout %v", r.took, timeout)
		}
		fake.nextPublish(t)
		fake.release()
	})

	t.Run("larger than the broker's maximum packet", func(t *testing.T) {
		api := api.in(t)
		fake.set(false, 0)
		api.expectError(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": strings.Repeat("x", 70<<10)},
			http.StatusRequestEntityTooLarge, pushapi.CodePayloadTooLarge)
		select {
		case p := <-fake.publishes:
			t.Fatalf("an oversized message reached the broker: %d bytes", len(p.Payload))
		default:
		}
	})

	t.Run("batch is pipelined and in order", func(t *testing.T) {
		api := api.in(t)
		fake.set(true, 0)
		const n = 200
		msgs := make([]map[string]any, n)
		for i := range msgs {
			msgs[i] = map[string]any{"topic": "batch/t", "payload": fmt.Sprint(i), "qos": 1 + i%2}
		}
		ch := async(api, http.MethodPost, "/v1/messages/batch", map[string]any{"messages": msgs})
		// Every message is on the wire while no acknowledgement was sent:
		// one round trip for the batch, not one per message.
		ids := make([]string, n)
		for i := range n {
			p := fake.nextPublish(t)
			if string(p.Payload) != fmt.Sprint(i) {
				t.Fatalf("PUBLISH %d has payload %q: not in batch order", i, p.Payload)
			}
			ids[i] = p.Properties.User[0].Value
		}
		pending(t, ch, "batch before its acknowledgements")
		fake.release()
		r := waitAnswer(t, ch)
		var res pushapi.BatchResults
		r.decode(t, &res)
		for i, br := range res.Results {
			if br.Error != nil || br.Published == nil || br.ID != ids[i] {
				t.Fatalf("result %d: %v, want id %s", i, br, ids[i])
			}
		}
	})

	t.Run("connection lost before the acknowledgement", func(t *testing.T) {
		api := api.in(t)
		fake.set(true, 0)
		ch := async(api, http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x"})
		fake.nextPublish(t)
		start := time.Now()
		fake.drop()
		r := waitAnswer(t, ch)
		if r.status != http.StatusServiceUnavailable || r.apiError(t).Code != pushapi.CodeBrokerUnavailable {
			t.Fatalf("publish on a lost connection: %s, want 503 broker_unavailable", r.response)
		}
		if took := time.Since(start); took > timeout/2 {
			t.Errorf("answered %v after the connection was lost: want at once, not at the publish timeout", took)
		}
		// The push API reconnects (the only broker: it is picked again)
		// and publishes again.
		fake.set(false, 0)
		fake.nextConnect(t)
		testutil.WaitFor(t, waitCond, func() error {
			if r := api.do(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "again"}); r.status != http.StatusOK {
				return fmt.Errorf("publish after reconnect: %s", r)
			}
			return nil
		})
	})
}

// TestBrokerStopsReading: a broker that accepts the connection but stops
// reading (stopped process, partition without a reset) cannot hold requests
// past the publish timeout: blocked writes time out, the connection is
// dropped, and the push API connects again.
func TestBrokerStopsReading(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	fake := startFakeBroker(t, "stuck")
	const timeout = time.Second
	api := startAPI(t, fake.node.Addr(), st, func(o *pushapi.Options) { o.Config.PublishTimeout = timeout })
	fake.nextConnect(t)
	api.waitBroker()
	fake.stall()
	// QoS 0 messages need no acknowledgement: they are answered once
	// written, until the socket buffers are full. Send waves of them until
	// writes block.
	big := strings.Repeat("x", 250<<10)
	var ok, failed int
	for wave := 0; failed == 0 && wave < 40; wave++ {
		var chans []<-chan timed
		for range 8 {
			chans = append(chans, async(api, http.MethodPost, "/v1/messages", map[string]any{"topic": "a", "payload": big, "qos": 0}))
		}
		for _, ch := range chans {
			r := waitAnswer(t, ch)
			switch {
			case r.status == http.StatusOK:
				ok++
			case r.status == http.StatusServiceUnavailable && r.apiError(t).Code == pushapi.CodeBrokerUnavailable:
				failed++
			default:
				t.Fatalf("%s", r.response)
			}
			if r.took > timeout+slack {
				t.Errorf("answered after %v, more than the publish timeout %v + %v", r.took, timeout, slack)
			}
		}
	}
	if failed == 0 {
		t.Fatalf("%d written, none blocked: the test did not fill the buffers", ok)
	}
	t.Logf("%d written before the broker's buffers filled, %d failed", ok, failed)
	fake.resume()
	fake.nextConnect(t) // dropped, then connected again
	testutil.WaitFor(t, waitCond, func() error {
		if r := api.do(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "again"}); r.status != http.StatusOK {
			return fmt.Errorf("publish after the stall: %s", r)
		}
		return nil
	})
}

// TestNoBroker: with no broker in the cluster, publishes fail at once with
// 503 and readiness says why; everything that needs no broker works.
func TestNoBroker(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	api := startAPI(t, "", st, nil)
	start := time.Now()
	e := api.expectError(http.MethodPost, "/v1/messages", map[string]any{"topic": "a/b", "payload": "x"}, http.StatusServiceUnavailable, pushapi.CodeBrokerUnavailable)
	if time.Since(start) > time.Second {
		t.Errorf("took %v to say %q", time.Since(start), e.Message)
	}
	r := api.raw(http.MethodGet, "/readyz", "", nil, nil)
	var rd pushapi.Readiness
	r.decode(t, &rd)
	if r.status != http.StatusServiceUnavailable || rd.Status != "not ready" || rd.Reason != "no broker connection" {
		t.Errorf("readyz: %s", r)
	}
	if err := api.Ready(context.Background()); err == nil || !strings.Contains(err.Error(), "no broker") {
		t.Errorf("Ready without a broker: %v", err)
	}
	var tok pushapi.DeviceToken
	api.expect(http.MethodPost, "/v1/devices/dev1/token", nil, http.StatusCreated, &tok)
	api.expectError(http.MethodGet, "/v1/devices/dev1", nil, http.StatusNotFound, pushapi.CodeNotFound)
}

func mustSigner(t testing.TB) *token.Signer {
	t.Helper()
	s, err := token.NewSigner([]string{tokenKey})
	if err != nil {
		t.Fatal(err)
	}
	return s
}
