package pushapi

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"
)

const testKey = "0123456789abcdef" // newUnstarted's API key

// serve sends a request to p's handler without a listener.
func serve(p *PushAPI, method, path, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testKey)
	rec := httptest.NewRecorder()
	p.e.ServeHTTP(rec, req)
	return rec
}

// checkErrorBody fails unless rec holds an error body whose code is in
// ErrorCodes with rec's status.
func checkErrorBody(t testing.TB, rec *httptest.ResponseRecorder) ErrorBody {
	t.Helper()
	var b ErrorBody
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil || b.Error.Code == "" || b.Error.Message == "" {
		t.Fatalf("status %d: body %q is not {error: {code, message}}: %v", rec.Code, rec.Body, err)
	}
	if s := statusOf(b.Error.Code); s != rec.Code {
		t.Fatalf("status %d with code %s, which ErrorCodes gives status %d", rec.Code, b.Error.Code, s)
	}
	return b
}

// TestPanicsAndUnknownErrorsAreInternal: a handler that panics or returns an
// error of no API type gets 500 internal as JSON, with nothing of the cause
// on the wire.
func TestPanicsAndUnknownErrorsAreInternal(t *testing.T) {
	p := newUnstarted(t)
	p.e.GET("/panic", func(echo.Context) error { panic("secret detail") }, p.requireKey)
	p.e.GET("/plain", func(echo.Context) error { return errors.New("secret detail") }, p.requireKey)
	for _, path := range []string{"/panic", "/plain"} {
		rec := serve(p, http.MethodGet, path, "")
		if rec.Code != http.StatusInternalServerError || checkErrorBody(t, rec).Error.Code != CodeInternal {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
		if strings.Contains(rec.Body.String(), "secret") || strings.Contains(rec.Body.String(), "goroutine") {
			t.Errorf("%s: the cause leaked: %s", path, rec.Body)
		}
	}
	// Still serving.
	if rec := serve(p, http.MethodGet, "/healthz", ""); rec.Code != http.StatusOK {
		t.Fatalf("healthz after a panic: %d", rec.Code)
	}
}

// FuzzPublishBody sends arbitrary bodies to POST /v1/messages and
// POST /v1/messages/batch. With no broker, a valid message gets 503; every
// answer is a documented JSON error, never a 500 or a panic.
func FuzzPublishBody(f *testing.F) {
	for _, s := range []string{
		`{"topic":"a/b","payload":"x"}`,
		`{"topic":"a/b","payload_base64":"AAEC","qos":2,"retain":true}`,
		`{"topic":"a","payload":"x","properties":{"content_type":"t","response_topic":"r","correlation_data":"AQ==","message_expiry":5,"user":{"k":"v"}}}`,
		`{"messages":[{"topic":"a","payload":"x"},{"topic":"#","payload":"y"}]}`,
		`{"topic":"$SYS/x","payload":"x"}`, `{"topic":"a","payload":"x","qos":3}`, `{"topic":"a"}`,
		`{"topic":"a","payload":"x"} {}`, `{"topic":`, `[]`, `null`, `""`, ``, `{"topic":"a","payload":"x","zz":1}`,
		`{"topic":"a","payload_base64":"!!"}`, `{"topic":"a\u0000","payload":""}`, `{"messages":null}`,
	} {
		f.Add(s)
	}
	p := newUnstarted(f)
	f.Fuzz(func(t *testing.T, body string) {
		for _, path := range []string{"/v1/messages", "/v1/messages/batch", "/v1/channels/c/messages"} {
			rec := serve(p, http.MethodPost, path, body)
			switch {
			case rec.Code == http.StatusOK && path == "/v1/messages/batch":
				var res BatchResults
				if err := json.Unmarshal(rec.Body.Bytes(), &res); err != nil || len(res.Results) == 0 {
					t.Fatalf("%s %q: 200 %s", path, body, rec.Body)
				}
				for _, r := range res.Results {
					if r.Error == nil || statusOf(r.Error.Code) == http.StatusInternalServerError {
						t.Fatalf("%s %q: result %v without a broker", path, body, r)
					}
				}
			case rec.Code == http.StatusOK:
				t.Fatalf("%s %q: published without a broker: %s", path, body, rec.Body)
			default:
				if e := checkErrorBody(t, rec); e.Error.Code == CodeInternal {
					t.Fatalf("%s %q: %s", path, body, rec.Body)
				}
			}
		}
	})
}
