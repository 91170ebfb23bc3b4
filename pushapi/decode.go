package pushapi

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"unicode/utf8"

	"github.com/labstack/echo/v4"
)

// Limits of names used in paths. A device ID and a channel are each one
// topic level (devices/{id}/inbox, push/{channel}).
const (
	maxDeviceID = 256
	maxChannel  = 256
	maxTopic    = 65535
)

// decodeBody decodes the request body, a single JSON object, into v: at most
// maxBody bytes, unknown fields rejected, trailing data rejected. Echo's
// binder is not used: it ignores unknown fields and mixes query and path
// values into the body.
func decodeBody(c echo.Context, maxBody int, v any) error {
	r := c.Request()
	if r.ContentLength > int64(maxBody) {
		return apiErr(CodeBodyTooLarge, "the request body has %d bytes, more than the %d allowed", r.ContentLength, maxBody)
	}
	raw, err := io.ReadAll(http.MaxBytesReader(c.Response(), r.Body, int64(maxBody)))
	if err != nil {
		return jsonError(err, maxBody)
	}
	// encoding/json turns invalid UTF-8, raw or as a lone surrogate escape,
	// into U+FFFD without a word: a topic or text payload would be
	// published rewritten. JSON text is UTF-8 (RFC 8259): refuse it.
	if at := invalidUTF8(raw); at >= 0 {
		return apiErr(CodeMalformedJSON, "the request body is not valid UTF-8 at byte %d (JSON text is UTF-8; send binary data as payload_base64)", at)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err, maxBody)
	}
	// One value only: anything but white space after it is an error.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if err == nil {
			return apiErr(CodeMalformedJSON, "unexpected data after the JSON object")
		}
		return jsonError(err, maxBody)
	}
	return nil
}

// decodeOptionalBody is decodeBody for endpoints whose body may be absent.
func decodeOptionalBody(c echo.Context, maxBody int, v any) error {
	r := c.Request()
	if r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return nil
	}
	err := decodeBody(c, maxBody, v)
	var ae *Error
	if errors.As(err, &ae) && ae.Code == CodeMalformedJSON && ae.Message == msgEmptyBody {
		return nil // chunked and empty
	}
	return err
}

const msgEmptyBody = "the request body is empty: want a JSON object"

func jsonError(err error, maxBody int) error {
	var (
		tooLarge *http.MaxBytesError
		syntax   *json.SyntaxError
		typ      *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &tooLarge):
		return apiErr(CodeBodyTooLarge, "the request body is larger than %d bytes", maxBody)
	case errors.Is(err, io.EOF):
		return apiErr(CodeMalformedJSON, msgEmptyBody)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return apiErr(CodeMalformedJSON, "the JSON body ends too early")
	case errors.As(err, &syntax):
		return apiErr(CodeMalformedJSON, "malformed JSON at byte %d: %s", syntax.Offset, strings.TrimPrefix(syntax.Error(), "json: "))
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			return apiErr(CodeWrongType, "want a JSON object, got %s", typ.Value)
		}
		return apiErr(CodeWrongType, "field %q: want %s, got %s", field, jsonKind(typ.Type.Kind().String()), typ.Value)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return apiErr(CodeUnknownField, "unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
	}
	return apiErr(CodeMalformedJSON, "malformed JSON: %s", strings.TrimPrefix(err.Error(), "json: "))
}

// jsonKind names a Go kind as a JSON type.
func jsonKind(kind string) string {
	switch kind {
	case "string":
		return "a string"
	case "bool":
		return "true or false"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		return "an integer"
	case "float32", "float64":
		return "a number"
	case "map", "struct":
		return "an object"
	case "slice", "array":
		return "an array"
	}
	return kind
}

// checkTopic returns why topic cannot be published to, or "".
func checkTopic(topic string) string {
	switch {
	case topic == "":
		return "must not be empty"
	case len(topic) > maxTopic:
		return fmt.Sprintf("has %d bytes, more than %d", len(topic), maxTopic)
	case !utf8.ValidString(topic):
		return "must be valid UTF-8"
	case strings.IndexByte(topic, 0) >= 0:
		return "must not contain NUL (U+0000)"
	case strings.ContainsAny(topic, "+#"):
		return "must not contain the wildcards + or #: a message goes to one topic"
	case topic[0] == '$':
		return "must not start with $ (reserved for the brokers, e.g. $SYS)"
	}
	return ""
}

// checkLevel returns why s is not a single topic level of at most max
// bytes, or "".
func checkLevel(s string, max int) string {
	switch {
	case s == "":
		return "must not be empty"
	case len(s) > max:
		return fmt.Sprintf("has %d bytes, more than %d", len(s), max)
	case !utf8.ValidString(s):
		return "must be valid UTF-8"
	case strings.IndexByte(s, 0) >= 0:
		return "must not contain NUL (U+0000)"
	case strings.ContainsAny(s, "/+#"):
		return "must be one topic level: no /, + or #"
	}
	return ""
}

// checkUTF8 returns why s is not an MQTT UTF-8 string, or "".
func checkUTF8(s string) string {
	switch {
	case len(s) > maxTopic:
		return fmt.Sprintf("has %d bytes, more than %d", len(s), maxTopic)
	case !utf8.ValidString(s):
		return "must be valid UTF-8"
	case strings.IndexByte(s, 0) >= 0:
		return "must not contain NUL (U+0000)"
	}
	return ""
}

// pathParam returns the path parameter name, percent-decoded. Echo routes
// on the escaped path (URL.RawPath) when the path has escapes that differ
// from the default encoding (%2F, %2B, ...), and then hands over the raw
// segment; otherwise on the decoded path, whose segments must not be
// decoded twice.
func pathParam(c echo.Context, name string) (string, error) {
	raw := c.Param(name)
	if c.Request().URL.RawPath == "" {
		return raw, nil
	}
	v, err := url.PathUnescape(raw)
	if err != nil {
		return "", apiErr(CodeBadParameter, "path segment %q is not percent-encoded correctly", raw)
	}
	return v, nil
}

// deviceParam returns the {id} path parameter, checked.
func deviceParam(c echo.Context) (string, error) { return deviceParamNamed(c, "id") }

// deviceParamNamed returns the path parameter name, checked as a device ID.
func deviceParamNamed(c echo.Context, name string) (string, error) {
	id, err := pathParam(c, name)
	if err != nil {
		return "", err
	}
	if e := checkDeviceID(id); e != nil {
		return "", e
	}
	return id, nil
}

// checkDeviceID returns why id cannot be a device's client ID, or nil.
func checkDeviceID(id string) *Error {
	if why := checkLevel(id, maxDeviceID); why != "" {
		return apiErr(CodeInvalidDeviceID, "device ID %s", why)
	}
	// Brokers refuse such a client ID (see token.CheckClientID): a token,
	// subscription or message for it would serve no device.
	if id[0] == '$' {
		return apiErr(CodeInvalidDeviceID, "device ID must not start with '$' (reserved for the broker's topics)")
	}
	return nil
}

// channelParam returns the {channel} path parameter, checked.
func channelParam(c echo.Context) (string, error) {
	ch, err := pathParam(c, "channel")
	if err != nil {
		return "", err
	}
	if why := checkLevel(ch, maxChannel); why != "" {
		return "", apiErr(CodeInvalidChannel, "channel %s", why)
	}
	return ch, nil
}

// decodeBase64 accepts standard base64 (RFC 4648 section 4), padded or not.
func decodeBase64(s string) ([]byte, error) {
	if strings.HasSuffix(s, "=") || len(s)%4 == 0 {
		return base64.StdEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// invalidUTF8 returns the offset of the first byte of raw that is not valid
// UTF-8, or of a \u escape in a JSON string that is a lone UTF-16
// surrogate (it would decode to U+FFFD), or -1.
func invalidUTF8(raw []byte) int {
	if !utf8.Valid(raw) {
		for i := 0; i < len(raw); {
			r, n := utf8.DecodeRune(raw[i:])
			if r == utf8.RuneError && n <= 1 {
				return i
			}
			i += n
		}
	}
	inString := false
	for i := 0; i < len(raw); i++ {
		switch b := raw[i]; {
		case b == '"':
			inString = !inString
		case b == '\\' && inString:
			if i+1 < len(raw) && raw[i+1] == 'u' {
				r, ok := hex4(raw, i+2)
				switch {
				case ok && r >= 0xD800 && r < 0xDC00: // high: a low must follow
					lo, lok := rune(0), false
					if i+7 < len(raw) && raw[i+6] == '\\' && raw[i+7] == 'u' {
						lo, lok = hex4(raw, i+8)
					}
					if !lok || lo < 0xDC00 || lo >= 0xE000 {
						return i
					}
					i += 11 // both escapes
					continue
				case ok && r >= 0xDC00 && r < 0xE000: // low without a high
					return i
				}
			}
			i++ // the escaped character
		}
	}
	return -1
}

// hex4 decodes the four hex digits of a \u escape at raw[at:].
func hex4(raw []byte, at int) (rune, bool) {
	if at+4 > len(raw) {
		return 0, false
	}
	var r rune
	for _, c := range raw[at : at+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}
