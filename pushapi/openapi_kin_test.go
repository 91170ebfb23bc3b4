package pushapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/legacy"

	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestOpenAPIDocument loads openapi.json with kin-openapi and validates it,
// then sends a request to every operation (and the error answers the tests
// can provoke): each request and each answer, status included, must match
// the document.
func TestOpenAPIDocument(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	doc, err := openapi3.NewLoader().LoadFromData(pushapi.OpenAPI)
	if err != nil {
		t.Fatalf("load openapi.json: %v", err)
	}
	if err := doc.Validate(ctx); err != nil {
		t.Fatalf("openapi.json is not valid OpenAPI 3.0: %v", err)
	}

	st := storetest.Open(t)
	fake := startFakeBroker(t, "fake")
	api := startAPI(t, fake.node.Addr(), st, nil)
	api.waitBroker()
	doc.Servers = openapi3.Servers{{URL: api.base}}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	covered := map[string]bool{}
	check := func(method, path string, body any, key string, want int) []byte {
		t.Helper()
		var raw []byte
		switch b := body.(type) {
		case nil:
		case string:
			raw = []byte(b)
		default:
			raw, _ = json.Marshal(b)
		}
		req, _ := http.NewRequest(method, api.base+path, bytes.NewReader(raw))
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		route, params, err := router.FindRoute(req)
		if err != nil {
			t.Fatalf("%s %s: not in openapi.json: %v", method, path, err)
		}
		covered[strings.ToUpper(method)+" "+route.Path] = true
		in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, IncludeResponseStatus: true}}
		// A request the API accepts must be valid by the document too (the
		// API checks more than a schema can say: limits, base64, cursors).
		if err := openapi3filter.ValidateRequest(ctx, in); err != nil && want < 400 {
			t.Errorf("%s %s: the API accepts a request the document says is invalid: %v", method, path, err)
		}
		r := api.raw(method, path, key, body, nil)
		if r.status != want {
			t.Fatalf("%s %s: %s, want %d", method, path, r, want)
		}
		req.Body = io.NopCloser(bytes.NewReader(raw))
		if err := openapi3filter.ValidateResponse(ctx, &openapi3filter.ResponseValidationInput{
			RequestValidationInput: in, Status: r.status, Header: r.header, Body: io.NopCloser(bytes.NewReader(r.body)),
			Options: in.Options,
		}); err != nil {
			t.Errorf("%s %s: answer %s does not match openapi.json: %v", method, path, r, err)
		}
		return r.body
	}
	msg := map[string]any{"topic": "a/b", "payload": "x", "properties": map[string]any{"user": map[string]string{"k": "v"}}}

	check("GET", "/healthz", nil, "", 200)
	check("GET", "/readyz", nil, "", 200)
	check("GET", "/openapi.json", nil, "", 200)
	check("GET", "/metrics", nil, apiKey, 200)
	check("GET", "/metrics", nil, "", 401)
	check("POST", "/v1/messages", msg, apiKey, 200)
	check("POST", "/v1/messages", msg, "", 401)
	check("POST", "/v1/messages", `{"topic":`, apiKey, 400)
	check("POST", "/v1/messages", map[string]any{"topic": "a/#", "payload": "x"}, apiKey, 422)
	check("POST", "/v1/messages", map[string]any{"topic": "a", "payload": strings.Repeat("x", 300<<10)}, apiKey, 413)
	fake.set(false, 0x87)
	check("POST", "/v1/messages", msg, apiKey, 502)
	fake.set(false, 0x97)
	check("POST", "/v1/messages", msg, apiKey, 503)
	fake.set(false, 0)
	check("POST", "/v1/messages/batch", map[string]any{"messages": []any{msg, map[string]any{"topic": "no/payload"}}}, apiKey, 200)
	check("POST", "/v1/messages/batch", map[string]any{"messages": []any{}}, apiKey, 422)
	check("POST", "/v1/channels/news/messages", map[string]any{"payload": "x", "qos": 0}, apiKey, 200)
	check("POST", "/v1/devices/d1/messages", map[string]any{"payload_base64": "AAE=", "qos": 2}, apiKey, 200)
	check("PUT", "/v1/devices/d1/channels/news", nil, apiKey, 201)
	check("PUT", "/v1/devices/d1/channels/news", nil, apiKey, 200)
	check("PUT", "/v1/devices/d2/channels/news", nil, apiKey, 201)
	check("GET", "/v1/channels/news/subscribers?limit=1", nil, apiKey, 200)
	check("GET", "/v1/channels/news/subscribers?cursor=x", nil, apiKey, 400)
	check("GET", "/v1/channels/news/subscribers", nil, apiKey, 200)
	check("GET", "/v1/devices/d1", nil, apiKey, 200)
	check("GET", "/v1/devices/nobody", nil, apiKey, 404)
	check("DELETE", "/v1/devices/d1/channels/news", nil, apiKey, 204)
	check("DELETE", "/v1/devices/d1/channels/news", nil, apiKey, 404)
	check("POST", "/v1/devices/d1/token", map[string]any{"ttl_seconds": 600}, apiKey, 201)
	check("POST", "/v1/devices/d1/token", nil, apiKey, 201)
	check("POST", "/v1/devices/d1/token", map[string]any{"ttl_seconds": 1}, apiKey, 422)
	check("DELETE", "/v1/devices/nobody/connection", nil, apiKey, 404)
	check("POST", "/v1/groups", map[string]any{"id": "g1", "name": "G", "attributes": map[string]string{"a": "1"}}, apiKey, 201)
	check("POST", "/v1/groups", map[string]any{}, apiKey, 201)
	check("POST", "/v1/groups", map[string]any{"id": "g1"}, apiKey, 409)
	check("POST", "/v1/groups", map[string]any{"id": "a/b"}, apiKey, 422)
	check("GET", "/v1/groups/g1", nil, apiKey, 200)
	check("GET", "/v1/groups/nope", nil, apiKey, 404)
	check("PATCH", "/v1/groups/g1", map[string]any{"attributes": map[string]any{"a": nil, "b": "2"}}, apiKey, 200)
	check("GET", "/v1/groups?limit=1", nil, apiKey, 200)
	check("GET", "/v1/groups?member=d1", nil, apiKey, 200)
	check("GET", "/v1/groups?cursor=x", nil, apiKey, 400)
	check("GET", "/v1/groups/g1/members", nil, apiKey, 200)
	// The fake broker has no admin endpoint: membership changes are
	// recorded, and the answer says a broker did not confirm them.
	check("PUT", "/v1/groups/g1/members/d1", nil, apiKey, 503)
	check("PUT", "/v1/groups/nope/members/d1", nil, apiKey, 404)
	check("DELETE", "/v1/groups/g1/members/d1", nil, apiKey, 503)
	check("POST", "/v1/groups/g1/messages", map[string]any{"payload": "x"}, apiKey, 200)
	check("POST", "/v1/groups/nope/messages", map[string]any{"payload": "x"}, apiKey, 404)
	check("DELETE", "/v1/groups/g1", nil, apiKey, 503)
	check("DELETE", "/v1/groups/g1", nil, apiKey, 404)
	stored := seedHistory(t, st, "push/news", []byte("text"), []byte{0xff, 0})
	check("POST", "/v1/groups", map[string]any{"id": "hist"}, apiKey, 201)
	seedHistory(t, st, "groups/hist", []byte("hi"))
	check("GET", "/v1/history?topic=push/news&limit=1", nil, apiKey, 200)
	check("GET", "/v1/history?topic=push/news", nil, apiKey, 200)
	check("GET", "/v1/history?topic=push/news&cursor=x", nil, apiKey, 400)
	check("GET", "/v1/history?topic=push/news&before=yesterday", nil, apiKey, 400)
	check("GET", "/v1/history?topic=push/%23", nil, apiKey, 422)
	check("GET", "/v1/groups/hist/messages?after=2020-01-01T00:00:00Z", nil, apiKey, 200)
	check("GET", "/v1/groups/nope/messages", nil, apiKey, 404)
	check("GET", "/v1/messages/"+stored[0].ID, nil, apiKey, 200)
	check("GET", "/v1/messages/"+stored[1].ID, nil, apiKey, 200)
	check("GET", "/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV", nil, apiKey, 404)
	check("GET", "/v1/messages/nope", nil, apiKey, 400)

	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			if !covered[method+" "+path] {
				t.Errorf("%s %s is not exercised by this test", method, path)
			}
		}
	}
}
