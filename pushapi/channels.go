package pushapi

import (
	"context"
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/rtm-dev/rtm/internal/store"
)

// Page sizes of GET /v1/channels/{channel}/subscribers.
const (
	defaultLimit = 100
	maxLimit     = 1000
)

// cursorPrefix starts every subscribers cursor, so a cursor from elsewhere
// is refused rather than misread.
const cursorPrefix = "s1:"

// Subscriber is one device receiving a push channel.
type Subscriber struct {
	Device string `json:"device"`
	// Via says how the subscription was made: "mqtt" (the device subscribed
	// to push/{channel} itself) or "api" (PUT /v1/devices/{id}/channels/{channel}).
	Via   string    `json:"via"`
	Since time.Time `json:"since"`
}

// Subscribers is the answer of GET /v1/channels/{channel}/subscribers.
type Subscribers struct {
	Subscribers []Subscriber `json:"subscribers"`
	// NextCursor fetches the next page; null on the last one.
	NextCursor *string `json:"next_cursor"`
}

// getSubscribers is GET /v1/channels/{channel}/subscribers?limit=&cursor=.
func (p *PushAPI) getSubscribers(c echo.Context) error {
	ch, err := channelParam(c)
	if err != nil {
		return err
	}
	limit := defaultLimit
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxLimit {
			return apiErr(CodeBadParameter, "limit must be an integer from 1 to %d, got %q", maxLimit, v)
		}
		limit = n
	}
	after := ""
	if v := c.QueryParam("cursor"); v != "" {
		if after, err = decodeCursor(v); err != nil {
			return err
		}
	}
	var (
		subs []store.PushSubscription
		next string
	)
	err = p.withStore(c, func(ctx context.Context) (err error) {
		subs, next, err = p.st.ChannelSubscribers(ctx, ch, after, limit)
		return err
	})
	if err != nil {
		return err
	}
	out := Subscribers{Subscribers: make([]Subscriber, 0, len(subs))}
	for _, s := range subs {
		out.Subscribers = append(out.Subscribers, Subscriber{Device: s.Device, Via: s.Via, Since: s.Since.UTC()})
	}
	if next != "" {
		cur := encodeCursor(next)
		out.NextCursor = &cur
	}
	return c.JSON(http.StatusOK, out)
}

func encodeCursor(device string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(cursorPrefix + device))
}

func decodeCursor(s string) (string, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || !strings.HasPrefix(string(b), cursorPrefix) || len(b) == len(cursorPrefix) {
		return "", apiErr(CodeBadCursor, "cursor %q was not returned by a previous page", s)
	}
	return string(b[len(cursorPrefix):]), nil
}
