package pushapi

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestInvalidUTF8(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want int
	}{
		{`{"payload":"plain"}`, -1},
		{`{"payload":"h\u00e9 \ud83d\ude00"}`, -1}, // é and a surrogate pair (😀)
		{"{\"payload\":\"h\xc3\xa9\"}", -1},        // é as UTF-8
		{`{"payload":"\\ud800"}`, -1},              // an escaped backslash, then text
		{`{"payload":"\ufffd"}`, -1},               // U+FFFD asked for is kept
		{"{\"payload\":\"\xff\"}", 12},
		{`{"payload":"x\ud800"}`, 13},
		{`{"payload":"\ud800\u0041"}`, 12},
		{`{"payload":"\udc00\ud800"}`, 12},
		{`{"payload":"\ud800`, 12},
		{`{"a\ud800":1}`, 3},
	} {
		if got := invalidUTF8([]byte(tc.raw)); got != tc.want {
			t.Errorf("invalidUTF8(%q) = %d, want %d", tc.raw, got, tc.want)
		}
	}
}

// FuzzInvalidUTF8 checks invalidUTF8 against encoding/json itself: a valid
// JSON text it accepts decodes without a U+FFFD that the text did not ask
// for, and one it refuses does not.
func FuzzInvalidUTF8(f *testing.F) {
	for _, s := range []string{`{"payload":"x"}`, `"\ud83d\ude00"`, `"\ud800"`, "\"\xff\"", `["\\ud800", "\udc00"]`, `{"\ud800":"\\"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		at := invalidUTF8(raw)
		if at >= len(raw) {
			t.Fatalf("offset %d beyond %d bytes", at, len(raw))
		}
		if !json.Valid(raw) || bytes.Contains(raw, []byte("\uFFFD")) || bytes.Contains(bytes.ToLower(raw), []byte(`\ufffd`)) {
			return
		}
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			return
		}
		out, _ := json.Marshal(v)
		replaced := strings.Contains(string(out), "\uFFFD") || strings.Contains(string(out), `\ufffd`)
		if replaced != (at >= 0) {
			t.Fatalf("invalidUTF8(%q) = %d, but decoding replaced characters: %v", raw, at, replaced)
		}
	})
}
