package pushapi_test

import (
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestBadInput sends what SPEC 10 lists as bad input: each request gets its
// documented status and code as a JSON error, and the push API keeps
// serving. No broker is needed: bad input is refused before publishing.
func TestBadInput(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	api := startAPI(t, "", st, func(o *pushapi.Options) {
		o.Config.MaxBody = 128 << 10
		o.Config.MaxPayload = 1024
	})
	msg := func(extra string) string { return `{"topic":"a/b","payload":"x"` + extra + `}` }
	batch := func(n int) map[string]any {
		ms := make([]map[string]any, n)
		for i := range ms {
			ms[i] = map[string]any{"topic": "a", "payload": "x"}
		}
		return map[string]any{"messages": ms}
	}
	b64 := base64.StdEncoding.EncodeToString
	tests := []struct {
		name         string
		method, path string
		body         any
		status       int
		code         string
	}{
		{"malformed JSON", "POST", "/v1/messages", `{"topic":`, 400, pushapi.CodeMalformedJSON},
		{"syntax error", "POST", "/v1/messages", `{"topic" "a"}`, 400, pushapi.CodeMalformedJSON},
		// encoding/json would publish these with U+FFFD in place.
		{"invalid UTF-8 in topic", "POST", "/v1/messages", "{\"topic\":\"a/\xff\",\"payload\":\"x\"}", 400, pushapi.CodeMalformedJSON},
		{"invalid UTF-8 in payload", "POST", "/v1/messages", "{\"topic\":\"a\",\"payload\":\"\xc3\x28\"}", 400, pushapi.CodeMalformedJSON},
		{"lone surrogate escape in payload", "POST", "/v1/channels/news/messages", `{"payload":"\ud800x"}`, 400, pushapi.CodeMalformedJSON},
		{"lone low surrogate in topic", "POST", "/v1/messages", `{"topic":"a/\udc00","payload":"x"}`, 400, pushapi.CodeMalformedJSON},
		{"trailing data", "POST", "/v1/messages", msg("") + ` {}`, 400, pushapi.CodeMalformedJSON},
		{"empty body", "POST", "/v1/messages", "", 400, pushapi.CodeMalformedJSON},
		{"unknown field", "POST", "/v1/messages", msg(`,"qso":1`), 400, pushapi.CodeUnknownField},
		{"unknown property", "POST", "/v1/messages", msg(`,"properties":{"expiry":5}`), 400, pushapi.CodeUnknownField},
		{"topic in a channel message", "POST", "/v1/channels/news/messages", msg(""), 400, pushapi.CodeUnknownField},
		{"qos as a string", "POST", "/v1/messages", msg(`,"qos":"1"`), 400, pushapi.CodeWrongType},
		{"qos not an integer", "POST", "/v1/messages", msg(`,"qos":1.5`), 400, pushapi.CodeWrongType},
		{"payload as a number", "POST", "/v1/messages", `{"topic":"a","payload":5}`, 400, pushapi.CodeWrongType},
		{"body an array", "POST", "/v1/messages", `[]`, 400, pushapi.CodeWrongType},
		{"user property not a string", "POST", "/v1/messages", msg(`,"properties":{"user":{"k":1}}`), 400, pushapi.CodeWrongType},
		{"missing topic", "POST", "/v1/messages", `{"payload":"x"}`, 422, pushapi.CodeInvalidTopic},
		{"wildcard + in topic", "POST", "/v1/messages", `{"topic":"a/+/b","payload":"x"}`, 422, pushapi.CodeInvalidTopic},
		{"wildcard # in topic", "POST", "/v1/messages", `{"topic":"a/#","payload":"x"}`, 422, pushapi.CodeInvalidTopic},
		{"$ topic", "POST", "/v1/messages", `{"topic":"$SYS/x","payload":"x"}`, 422, pushapi.CodeInvalidTopic},
		{"NUL in topic", "POST", "/v1/messages", `{"topic":"a\u0000b","payload":"x"}`, 422, pushapi.CodeInvalidTopic},
		{"topic too long", "POST", "/v1/messages", map[string]any{"topic": strings.Repeat("t", 65536), "payload": "x"}, 422, pushapi.CodeInvalidTopic},
		{"wildcard response topic", "POST", "/v1/messages", msg(`,"properties":{"response_topic":"r/#"}`), 422, pushapi.CodeInvalidTopic},
		{"payload over the limit", "POST", "/v1/messages", map[string]any{"topic": "a", "payload": strings.Repeat("x", 1025)}, 413, pushapi.CodePayloadTooLarge},
		{"base64 payload over the limit", "POST", "/v1/messages", map[string]any{"topic": "a", "payload_base64": b64(make([]byte, 1025))}, 413, pushapi.CodePayloadTooLarge},
		{"body over the limit", "POST", "/v1/messages", map[string]any{"topic": "a", "payload": strings.Repeat("x", 130<<10)}, 413, pushapi.CodeBodyTooLarge},
		{"payload and payload_base64", "POST", "/v1/messages", msg(`,"payload_base64":"eA=="`), 422, pushapi.CodeInvalidPayload},
		{"no payload", "POST", "/v1/messages", `{"topic":"a"}`, 422, pushapi.CodeInvalidPayload},
		{"base64 error", "POST", "/v1/messages", `{"topic":"a","payload_base64":"not*base64"}`, 422, pushapi.CodeInvalidPayload},
		{"correlation data not base64", "POST", "/v1/messages", msg(`,"properties":{"correlation_data":"%%"}`), 422, pushapi.CodeInvalidPayload},
		{"qos 3", "POST", "/v1/messages", msg(`,"qos":3`), 422, pushapi.CodeInvalidQoS},
		{"qos -1", "POST", "/v1/messages", msg(`,"qos":-1`), 422, pushapi.CodeInvalidQoS},
		{"message expiry 0", "POST", "/v1/messages", msg(`,"properties":{"message_expiry":0}`), 422, pushapi.CodeInvalidProperties},
		{"reserved user property", "POST", "/v1/messages", msg(`,"properties":{"user":{"rtm-message-id":"x"}}`), 422, pushapi.CodeInvalidProperties},
		{"NUL in content type", "POST", "/v1/messages", msg(`,"properties":{"content_type":"a\u0000"}`), 422, pushapi.CodeInvalidProperties},
		{"batch of 1001", "POST", "/v1/messages/batch", batch(1001), 422, pushapi.CodeInvalidBatch},
		{"empty batch", "POST", "/v1/messages/batch", `{"messages":[]}`, 422, pushapi.CodeInvalidBatch},
		{"unknown field in a batch message", "POST", "/v1/messages/batch", `{"messages":[{"topic":"a","payload":"x","x":1}]}`, 400, pushapi.CodeUnknownField},
		{"wildcard channel", "POST", "/v1/channels/a%2Bb/messages", `{"payload":"x"}`, 422, pushapi.CodeInvalidChannel},
		{"multi-level channel", "GET", "/v1/channels/a%2Fb/subscribers", nil, 422, pushapi.CodeInvalidChannel},
		{"channel not UTF-8", "GET", "/v1/channels/%FF/subscribers", nil, 422, pushapi.CodeInvalidChannel},
		{"channel too long", "GET", "/v1/channels/" + strings.Repeat("c", 257) + "/subscribers", nil, 422, pushapi.CodeInvalidChannel},
		{"device ID with #", "GET", "/v1/devices/a%23", nil, 422, pushapi.CodeInvalidDeviceID},
		{"device ID too long", "POST", "/v1/devices/" + strings.Repeat("d", 257) + "/messages", `{"payload":"x"}`, 422, pushapi.CodeInvalidDeviceID},
		// A client ID is a topic level (devices/{id}/inbox, %c in auth.acl):
		// every endpoint that takes one refuses what is not one level.
		{"token for a/b", "POST", "/v1/devices/a%2Fb/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"token for a+", "POST", "/v1/devices/a%2B/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"token for #", "POST", "/v1/devices/%23/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"token for $SYS", "POST", "/v1/devices/$SYS/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"token for $x (escaped)", "POST", "/v1/devices/%24x/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"message to a/b", "POST", "/v1/devices/a%2Fb/messages", `{"payload":"x"}`, 422, pushapi.CodeInvalidDeviceID},
		{"message to $x", "POST", "/v1/devices/$x/messages", `{"payload":"x"}`, 422, pushapi.CodeInvalidDeviceID},
		{"subscribe a/b", "PUT", "/v1/devices/a%2Fb/channels/news", nil, 422, pushapi.CodeInvalidDeviceID},
		{"unsubscribe a+b", "DELETE", "/v1/devices/a%2Bb/channels/news", nil, 422, pushapi.CodeInvalidDeviceID},
		{"presence of $x", "GET", "/v1/devices/$x", nil, 422, pushapi.CodeInvalidDeviceID},
		{"kick a/b", "DELETE", "/v1/devices/a%2Fb/connection", nil, 422, pushapi.CodeInvalidDeviceID},
		{"limit 0", "GET", "/v1/channels/c/subscribers?limit=0", nil, 400, pushapi.CodeBadParameter},
		{"limit 1001", "GET", "/v1/channels/c/subscribers?limit=1001", nil, 400, pushapi.CodeBadParameter},
		{"limit not a number", "GET", "/v1/channels/c/subscribers?limit=ten", nil, 400, pushapi.CodeBadParameter},
		{"bad cursor", "GET", "/v1/channels/c/subscribers?cursor=garbage!", nil, 400, pushapi.CodeBadCursor},
		{"foreign cursor", "GET", "/v1/channels/c/subscribers?cursor=" + base64.RawURLEncoding.EncodeToString([]byte("d1")), nil, 400, pushapi.CodeBadCursor},
		{"kick unknown device", "DELETE", "/v1/devices/nobody/connection", nil, 404, pushapi.CodeNotFound},
		{"unknown device", "GET", "/v1/devices/nobody", nil, 404, pushapi.CodeNotFound},
		{"unsubscribe not subscribed", "DELETE", "/v1/devices/nobody/channels/news", nil, 404, pushapi.CodeNotFound},
		{"body on subscribe", "PUT", "/v1/devices/d/channels/news", `{"qos":1}`, 400, pushapi.CodeUnknownField},
		{"token TTL too short", "POST", "/v1/devices/d/token", `{"ttl_seconds":10}`, 422, pushapi.CodeInvalidTTL},
		{"token TTL over auth.token_ttl", "POST", "/v1/devices/d/token", `{"ttl_seconds":3601}`, 422, pushapi.CodeInvalidTTL},
		{"token TTL not a number", "POST", "/v1/devices/d/token", `{"ttl_seconds":"1h"}`, 400, pushapi.CodeWrongType},
		{"token for a cluster member's name", "POST", "/v1/devices/api1/token", nil, 422, pushapi.CodeInvalidDeviceID},
		{"unknown endpoint", "GET", "/v1/nothing", nil, 404, pushapi.CodeNotFound},
		{"wrong method", "GET", "/v1/messages", nil, 405, pushapi.CodeMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api := api.in(t)
			r := api.do(tt.method, tt.path, tt.body)
			if r.status != tt.status {
				t.Fatalf("%s %.80s: %.300s, want %d %s", tt.method, tt.path, r, tt.status, tt.code)
			}
			if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			if e := r.apiError(t); e.Code != tt.code {
				t.Fatalf("%s %.80s: %.300s, want code %s", tt.method, tt.path, r, tt.code)
			}
		})
	}

	t.Run("405 names the allowed methods", func(t *testing.T) {
		api := api.in(t)
		r := api.do(http.MethodPatch, "/v1/devices/d/channels/c", nil)
		if r.status != 405 || !strings.Contains(r.header.Get("Allow"), "PUT") || !strings.Contains(r.header.Get("Allow"), "DELETE") {
			t.Fatalf("%s, Allow %q", r, r.header.Get("Allow"))
		}
	})

	t.Run("body over the limit without a length", func(t *testing.T) {
		api := api.in(t)
		// A chunked body has no Content-Length to refuse early.
		pr, pw := io.Pipe()
		go func() {
			_, _ = io.WriteString(pw, `{"topic":"a","payload":"`+strings.Repeat("x", 200<<10)+`"}`)
			_ = pw.Close()
		}()
		req, _ := http.NewRequest(http.MethodPost, api.base+"/v1/messages", pr)
		req.Header.Set("Authorization", "Bearer "+apiKey)
		res, err := api.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		r := response{status: res.StatusCode, header: res.Header, body: b}
		if r.status != 413 || r.apiError(t).Code != pushapi.CodeBodyTooLarge {
			t.Fatalf("%s, want 413 body_too_large", r)
		}
	})

	// Still serving.
	if r := api.raw(http.MethodGet, "/healthz", "", nil, nil); r.status != 200 {
		t.Fatalf("healthz after bad input: %s", r)
	}
}

// TestAuth: every endpoint but /healthz, /readyz and /openapi.json needs an
// API key.
func TestAuth(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	api := startAPI(t, "", st, nil)
	const path = "/v1/channels/c/subscribers"

	for _, tt := range []struct {
		name   string
		header string
	}{
		{"no key", ""},
		{"wrong key", "Bearer wrong-key-0123456789"},
		{"key prefix", "Bearer " + apiKey[:10]},
		{"not bearer", "Basic " + base64.StdEncoding.EncodeToString([]byte("u:"+apiKey))},
		{"no scheme", apiKey},
	} {
		t.Run(tt.name, func(t *testing.T) {
			api := api.in(t)
			h := http.Header{}
			if tt.header != "" {
				h.Set("Authorization", tt.header)
			}
			r := api.raw(http.MethodGet, path, "", nil, h)
			if r.status != http.StatusUnauthorized || r.apiError(t).Code != pushapi.CodeUnauthorized {
				t.Fatalf("%s, want 401 unauthorized", r)
			}
			if !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("WWW-Authenticate %q, want Bearer", r.header.Get("WWW-Authenticate"))
			}
		})
	}
	for _, key := range []string{apiKey, apiKey2} {
		if r := api.raw(http.MethodGet, path, key, nil, nil); r.status != http.StatusOK {
			t.Errorf("key %.6s…: %s, want 200", key, r)
		}
	}
	for _, p := range []string{"/healthz", "/openapi.json", "/readyz"} {
		if r := api.raw(http.MethodGet, p, "", nil, nil); r.status == http.StatusUnauthorized {
			t.Errorf("%s needs a key: %s", p, r)
		}
	}
	if r := api.raw(http.MethodGet, "/metrics", "", nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("/metrics without a key: %s, want 401", r)
	}
	r := api.raw(http.MethodGet, "/metrics", apiKey, nil, nil)
	if r.status != http.StatusOK || !strings.Contains(string(r.body), `rtm_pushapi_requests_total{code="401",method="GET",route="/v1/channels/:channel/subscribers"}`) ||
		!strings.Contains(string(r.body), "rtm_pushapi_broker_connected 0") {
		t.Errorf("/metrics: %d, no request or broker series:\n%.2000s", r.status, r.body)
	}
}

// TestStoreDown: with the store gone, requests that need it fail with 503
// store_unavailable, and the push API keeps serving.
func TestStoreDown(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: storetest.DBName(t)})
	if err != nil {
		t.Fatal(err)
	}
	api := startAPI(t, "", st, nil)
	api.expect(http.MethodPut, "/v1/devices/d1/channels/news", nil, http.StatusCreated, nil)
	if err := st.DB().Drop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ method, path string }{
		{"GET", "/v1/devices/d1"},
		{"PUT", "/v1/devices/d1/channels/news"},
		{"DELETE", "/v1/devices/d1/channels/news"},
		{"GET", "/v1/channels/news/subscribers"},
		{"DELETE", "/v1/devices/d1/connection"},
	} {
		e := api.expectError(r.method, r.path, nil, http.StatusServiceUnavailable, pushapi.CodeStoreUnavailable)
		if strings.Contains(e.Message, "mongo") || strings.Contains(e.Message, "127.0.0.1") {
			t.Errorf("%s %s: message %q leaks the cause", r.method, r.path, e.Message)
		}
	}
	var rd pushapi.Readiness
	r := api.raw(http.MethodGet, "/readyz", "", nil, nil)
	r.decode(t, &rd)
	if r.status != http.StatusServiceUnavailable || rd.Store == "ok" {
		t.Errorf("readyz with the store down: %s", r)
	}
	api.expect(http.MethodPost, "/v1/devices/d1/token", nil, http.StatusCreated, nil)
}
