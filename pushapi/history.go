package pushapi

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/eclipse/paho.golang/paho"
	"github.com/labstack/echo/v4"
	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/internal/store"
)

// userPropPublisher names the API key a message was published with; the
// brokers record it as the message's publisher in history (plugins.History
// honours it from services only).
const userPropPublisher = "rtm-publisher"

// ctxKeyName is the echo context key of the request's API key name.
const ctxKeyName = "rtm-api-key-name"

// historyCursorPrefix starts every history cursor (a version, so a
// subscribers cursor or an older format is refused, not misread).
const historyCursorPrefix = "h1:"

// KeyName is the name an API key is known by in history and logs: "key-"
// and the first 8 hex digits of its SHA-256 (the key itself is a secret).
func KeyName(key string) string {
	sum := sha256.Sum256([]byte(key))
	return "key-" + hex.EncodeToString(sum[:4])
}

// withPublisher adds the request's API key name to a message.
func withPublisher(c echo.Context, pub *paho.Publish) {
	name, _ := c.Get(ctxKeyName).(string)
	if name == "" || pub.Properties == nil {
		return
	}
	pub.Properties.User = append(pub.Properties.User, paho.UserProperty{Key: userPropPublisher, Value: name})
}

// StoredMessage is a message from history.
type StoredMessage struct {
	ID    string `json:"id"`
	Topic string `json:"topic"`
	// Payload is the payload as text when it is valid UTF-8; otherwise
	// PayloadBase64 holds it in standard base64. Encoding says which:
	// "text" or "base64".
	Payload       *string `json:"payload,omitempty"`
	PayloadBase64 *string `json:"payload_base64,omitempty"`
	Encoding      string  `json:"encoding"`
	QoS           int     `json:"qos"`
	Retain        bool    `json:"retain"`
	// Publisher is the publishing device's client ID, or the API key's
	// name (KeyName) for messages published through the push API.
	Publisher   string               `json:"publisher"`
	Node        string               `json:"node"`
	Timestamp   time.Time            `json:"timestamp"`
	ContentType string               `json:"content_type,omitempty"`
	User        []store.UserProperty `json:"user_properties,omitempty"`
}

// HistoryGap says messages of the range were not stored (docs/history.md).
type HistoryGap struct {
	Filter string    `json:"filter"`
	From   time.Time `json:"from"`
	To     time.Time `json:"to"`
	Count  int64     `json:"count"`
	Node   string    `json:"node"`
	Reason string    `json:"reason"`
}

// HistoryPage is a page of a topic's history, newest first.
type HistoryPage struct {
	Topic    string          `json:"topic"`
	Messages []StoredMessage `json:"messages"`
	// NextCursor fetches the next (older) page; null on the last one.
	NextCursor *string `json:"next_cursor"`
	// Gaps lists the messages of the page's time range that history could
	// not store; empty when it is complete.
	Gaps []HistoryGap `json:"gaps"`
}

func storedMessage(m store.HistoryMessage) StoredMessage {
	out := StoredMessage{ID: m.ID, Topic: m.Topic, QoS: m.QoS, Retain: m.Retain, Publisher: m.Publisher, Node: m.Node,
		Timestamp: m.Time.UTC(), ContentType: m.ContentType, User: m.User}
	if utf8.Valid(m.Payload) {
		s := string(m.Payload)
		out.Payload, out.Encoding = &s, "text"
	} else {
		s := base64.StdEncoding.EncodeToString(m.Payload)
		out.PayloadBase64, out.Encoding = &s, "base64"
	}
	return out
}

// historyCursor is what a cursor holds: the topic and the exclusive bounds
// of the rest of the walk.
type historyCursor struct {
	Topic  string `json:"t"`
	Before string `json:"b"`
	After  string `json:"a,omitempty"`
}

func encodeHistoryCursor(c historyCursor) string {
	b, _ := json.Marshal(c)
	return base64.RawURLEncoding.EncodeToString(append([]byte(historyCursorPrefix), b...))
}

func decodeHistoryCursor(s string) (historyCursor, error) {
	var c historyCursor
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || !strings.HasPrefix(string(b), historyCursorPrefix) ||
		json.Unmarshal(b[len(historyCursorPrefix):], &c) != nil || c.Topic == "" || !isID(c.Before) || (c.After != "" && !isID(c.After)) {
		return c, apiErr(CodeBadCursor, "cursor %q was not returned by a previous page", s)
	}
	return c, nil
}

func isID(s string) bool {
	_, err := ulid.ParseStrict(s)
	return err == nil
}

// idBound turns a before/after parameter into an exclusive id bound: a
// message id as is, or an RFC 3339 time as the first (before) or last
// (after) id of its millisecond, so the bound excludes the messages of
// that millisecond.
func idBound(name, v string, before bool) (string, time.Time, error) {
	if id, err := ulid.ParseStrict(v); err == nil {
		return strings.ToUpper(v), ulid.Time(id.Time()), nil
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return "", time.Time{}, apiErr(CodeBadParameter, "%s must be a message id or an RFC 3339 time (e.g. 2026-01-02T15:04:05Z), got %q", name, v)
	}
	if t.UnixMilli() < 0 || uint64(t.UnixMilli()) > ulid.MaxTime() {
		return "", time.Time{}, apiErr(CodeBadParameter, "%s is out of range: %q", name, v)
	}
	var id ulid.ULID
	_ = id.SetTime(uint64(t.UnixMilli()))
	if !before {
		_ = id.SetEntropy([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	}
	return id.String(), t, nil
}

// getHistory is GET /v1/history?topic=&before=&after=&limit=&cursor=.
func (p *PushAPI) getHistory(c echo.Context) error {
	topic := c.QueryParam("topic")
	if topic == "" && c.QueryParam("cursor") == "" {
		return apiErr(CodeBadParameter, "topic is required: the topic whose messages to list (no wildcards)")
	}
	return p.history(c, topic)
}

// getGroupMessages is GET /v1/groups/{id}/messages: the history of topic
// groups/{id}.
func (p *PushAPI) getGroupMessages(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	// As for posting to it: an unknown (or deleted) group is 404, not an
	// empty history that would hide a wrong id.
	err = p.storeCall(c, func(ctx context.Context) error {
		ok, err := p.st.GroupExists(ctx, id)
		if err == nil && !ok {
			return groupStoreError(id, store.ErrGroupNotFound)
		}
		return err
	})
	if err != nil {
		return err
	}
	return p.history(c, groupTopic(id))
}

func (p *PushAPI) history(c echo.Context, topic string) error {
	q := store.HistoryQuery{Topic: topic, Limit: 50}
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxLimit {
			return apiErr(CodeBadParameter, "limit must be an integer from 1 to %d, got %q", maxLimit, v)
		}
		q.Limit = n
	}
	var hi, lo time.Time // the page's time range, for gaps
	if v := c.QueryParam("cursor"); v != "" {
		if c.QueryParam("before") != "" || c.QueryParam("after") != "" {
			return apiErr(CodeBadParameter, "give a cursor or before/after, not both: the cursor keeps the bounds of its first page")
		}
		cur, err := decodeHistoryCursor(v)
		if err != nil {
			return err
		}
		if topic != "" && topic != cur.Topic {
			return apiErr(CodeBadCursor, "the cursor is for topic %q, not %q", cur.Topic, topic)
		}
		q.Topic, q.Before, q.After = cur.Topic, cur.Before, cur.After
		hi = idTime(cur.Before)
		if cur.After != "" {
			lo = idTime(cur.After)
		}
	} else {
		var err error
		if v := c.QueryParam("before"); v != "" {
			if q.Before, hi, err = idBound("before", v, true); err != nil {
				return err
			}
		}
		if v := c.QueryParam("after"); v != "" {
			if q.After, lo, err = idBound("after", v, false); err != nil {
				return err
			}
		}
	}
	if why := checkTopic(q.Topic); why != "" {
		return apiErr(CodeInvalidTopic, "topic %s", why)
	}
	var (
		msgs []store.HistoryMessage
		gaps []store.HistoryGap
	)
	err := p.withStore(c, func(ctx context.Context) (err error) {
		if msgs, err = p.st.History(ctx, q); err != nil {
			return err
		}
		from := lo
		if len(msgs) == q.Limit {
			from = msgs[len(msgs)-1].Time
		}
		gaps, err = p.st.HistoryGaps(ctx, from, hi)
		return err
	})
	if err != nil {
		return err
	}
	out := HistoryPage{Topic: q.Topic, Messages: make([]StoredMessage, 0, len(msgs)), Gaps: []HistoryGap{}}
	for _, m := range msgs {
		out.Messages = append(out.Messages, storedMessage(m))
	}
	for _, g := range gaps {
		if g.Filter == q.Topic || matchFilter(g.Filter, q.Topic) {
			out.Gaps = append(out.Gaps, HistoryGap{Filter: g.Filter, From: g.From.UTC(), To: g.To.UTC(), Count: g.Count, Node: g.Node, Reason: g.Reason})
		}
	}
	if len(msgs) == q.Limit {
		cur := encodeHistoryCursor(historyCursor{Topic: q.Topic, Before: msgs[len(msgs)-1].ID, After: q.After})
		out.NextCursor = &cur
	}
	return c.JSON(http.StatusOK, out)
}

func idTime(id string) time.Time {
	u, err := ulid.ParseStrict(id)
	if err != nil {
		return time.Time{}
	}
	return ulid.Time(u.Time())
}

// getStoredMessage is GET /v1/messages/{id}.
func (p *PushAPI) getStoredMessage(c echo.Context) error {
	id, err := pathParam(c, "id")
	if err != nil {
		return err
	}
	if !isID(id) {
		return apiErr(CodeBadParameter, "message id %q is not a message id (26 characters, as POST /v1/messages returns)", id)
	}
	var m store.HistoryMessage
	err = p.withStore(c, func(ctx context.Context) (err error) {
		m, err = p.st.HistoryByID(ctx, strings.ToUpper(id))
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		return err
	})
	if err != nil {
		return err
	}
	if m.ID == "" {
		return apiErr(CodeNotFound, "no stored message %s: not on a history topic, older than history.retention, or not written yet", id)
	}
	return c.JSON(http.StatusOK, storedMessage(m))
}

// matchFilter reports whether the MQTT filter f matches topic.
func matchFilter(f, topic string) bool {
	for {
		fl, frest, fmore := strings.Cut(f, "/")
		if fl == "#" {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		if !fmore || !tmore {
			return fmore == tmore || (fmore && frest == "#")
		}
		f, topic = frest, trest
	}
}
