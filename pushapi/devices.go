package pushapi

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
)

// Token lifetimes a request may ask for: at least minTokenTTL, at most
// auth.token_ttl.
const minTokenTTL = time.Minute

// subscribeQoS is the QoS of server-side push subscriptions, as of those
// the brokers re-apply when a device connects.
const subscribeQoS = 1

// Applied values of a server-side subscription.
const (
	AppliedNow           = "now"             // the device's broker holds it (connected, or a persistent session)
	AppliedAtNextConnect = "at_next_connect" // no session holds it: the broker applies it at the next connect
)

// Device is the answer of GET /v1/devices/{id}.
type Device struct {
	ID string `json:"id"`
	// Online is true while the device is connected: its broker recorded a
	// connection, and that broker is alive in the cluster as the same
	// process (see online).
	Online bool `json:"online"`
	// Node is the broker of the last connection; null if none was seen.
	Node *string `json:"node"`
	// Since is when the last connection started; LastSeen the last connect
	// or disconnect. Null if none was seen.
	Since    *time.Time      `json:"since"`
	LastSeen *time.Time      `json:"last_seen"`
	Channels []DeviceChannel `json:"channels"`
}

// DeviceChannel is one push subscription of a device.
type DeviceChannel struct {
	Channel string    `json:"channel"`
	Via     string    `json:"via"`
	Since   time.Time `json:"since"`
}

// ChannelSubscription is the answer of PUT /v1/devices/{id}/channels/{channel}.
type ChannelSubscription struct {
	Device  string    `json:"device"`
	Channel string    `json:"channel"`
	Via     string    `json:"via"`
	Since   time.Time `json:"since"`
	Applied string    `json:"applied"` // AppliedNow or AppliedAtNextConnect
}

// TokenRequest is the body of POST /v1/devices/{id}/token; it may be
// absent.
type TokenRequest struct {
	// TTLSeconds is the token's lifetime; absent means auth.token_ttl.
	TTLSeconds *int64 `json:"ttl_seconds,omitempty"`
}

// DeviceToken is the answer of POST /v1/devices/{id}/token: the device
// connects with client ID ClientID, username Username and password Token.
type DeviceToken struct {
	ClientID  string    `json:"client_id"`
	Username  string    `json:"username"`
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// members returns the gossip view.
func (p *PushAPI) members() []cluster.Member { return p.node.Members() }

// getDevice is GET /v1/devices/{id}.
func (p *PushAPI) getDevice(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	var (
		pr   store.Presence
		subs []store.PushSubscription
	)
	err = p.withStore(c, func(ctx context.Context) (err error) {
		if pr, err = p.st.Presence(ctx, id); err != nil {
			return err
		}
		subs, err = p.st.DeviceChannels(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	if !pr.Seen && len(subs) == 0 {
		return apiErr(CodeNotFound, "device %q was never connected and has no push subscription", id)
	}
	d := Device{ID: id, Channels: make([]DeviceChannel, 0, len(subs))}
	if pr.Seen {
		d.Online = online(pr, p.members())
		node, since, seen := pr.Node, pr.Since.UTC(), pr.LastSeen.UTC()
		d.Node, d.Since, d.LastSeen = &node, &since, &seen
	}
	for _, s := range subs {
		d.Channels = append(d.Channels, DeviceChannel{Channel: s.Channel, Via: s.Via, Since: s.Since.UTC()})
	}
	return c.JSON(http.StatusOK, d)
}

// putDeviceChannel is PUT /v1/devices/{id}/channels/{channel}: the
// subscription is recorded, then applied by the broker of the device's
// last connection if that broker holds its session (connected, or a
// persistent session while offline, which then queues the channel's
// messages for it). Otherwise every broker applies it when the device
// next connects.
func (p *PushAPI) putDeviceChannel(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	ch, err := channelParam(c)
	if err != nil {
		return err
	}
	if err := decodeOptionalBody(c, p.cfg.MaxBody, &struct{}{}); err != nil {
		return err
	}
	var (
		created bool
		rec     store.PushSubscription
		pr      store.Presence
	)
	err = p.withStore(c, func(ctx context.Context) (err error) {
		if created, err = p.st.AddPushSubscription(ctx, id, ch, store.ViaAPI); err != nil {
			return err
		}
		if rec, err = p.subscription(ctx, id, ch); err != nil {
			return err
		}
		pr, err = p.st.Presence(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	out := ChannelSubscription{Device: id, Channel: ch, Via: rec.Via, Since: rec.Since.UTC(), Applied: AppliedAtNextConnect}
	if admin, ok := brokerAdmin(p.members(), pr.Node); ok && pr.Seen {
		err := p.admin.subscribe(c.Request().Context(), admin, id, pushTopic(ch), subscribeQoS)
		switch {
		case err == nil:
			out.Applied = AppliedNow
		case errors.Is(err, errUnknownClient):
			// No session there: the next connect applies it.
		case pr.Online: // as recorded: a leaving broker may still hold the session (online() is for display)
			return &Error{Status: http.StatusServiceUnavailable, Code: CodeNodeUnavailable, cause: err,
				Message: "the subscription is recorded, but broker " + pr.Node + ", where the device is connected, did not apply it; retry (PUT is idempotent)"}
		default:
			p.log.Warn("push subscription not applied to an offline session", "client_id", id, "broker", pr.Node, "error", err)
		}
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	return c.JSON(status, out)
}

// subscription returns the record of the device's push subscription to
// channel.
func (p *PushAPI) subscription(ctx context.Context, id, ch string) (store.PushSubscription, error) {
	subs, err := p.st.DeviceChannels(ctx, id)
	if err != nil {
		return store.PushSubscription{}, err
	}
	for _, s := range subs {
		if s.Channel == ch {
			return s, nil
		}
	}
	return store.PushSubscription{Device: id, Channel: ch, Via: store.ViaAPI, Since: time.Now()}, nil
}

// deleteDeviceChannel is DELETE /v1/devices/{id}/channels/{channel}: the
// subscription is removed from the session that holds it, then from the
// store. If the device's broker cannot be reached while it is connected,
// nothing changes and the answer is 503.
func (p *PushAPI) deleteDeviceChannel(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	ch, err := channelParam(c)
	if err != nil {
		return err
	}
	var (
		subs []store.PushSubscription
		pr   store.Presence
	)
	err = p.withStore(c, func(ctx context.Context) (err error) {
		if subs, err = p.st.DeviceChannels(ctx, id); err != nil {
			return err
		}
		pr, err = p.st.Presence(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	found := false
	for _, s := range subs {
		found = found || s.Channel == ch
	}
	if !found {
		return apiErr(CodeNotFound, "device %q is not subscribed to channel %q", id, ch)
	}
	if admin, ok := brokerAdmin(p.members(), pr.Node); ok && pr.Seen {
		err := p.admin.unsubscribe(c.Request().Context(), admin, id, pushTopic(ch))
		switch {
		case err == nil, errors.Is(err, errUnknownClient):
		case pr.Online: // as recorded: a leaving broker may still hold the session (online() is for display)
			return &Error{Status: http.StatusServiceUnavailable, Code: CodeNodeUnavailable, cause: err,
				Message: "broker " + pr.Node + ", where the device is connected, did not remove the subscription; nothing changed, retry"}
		default:
			p.log.Warn("push subscription not removed from an offline session", "client_id", id, "broker", pr.Node, "error", err)
		}
	}
	err = p.withStore(c, func(ctx context.Context) error {
		_, err := p.st.RemovePushSubscription(ctx, id, ch)
		return err
	})
	if err != nil {
		return err
	}
	return c.NoContent(http.StatusNoContent)
}

// postDeviceToken is POST /v1/devices/{id}/token.
func (p *PushAPI) postDeviceToken(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	var req TokenRequest
	if err := decodeOptionalBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	ttl := p.tokenTTL
	if req.TTLSeconds != nil {
		s := *req.TTLSeconds
		if s < int64(minTokenTTL/time.Second) || s > int64(p.tokenTTL/time.Second) {
			return apiErr(CodeInvalidTTL, "ttl_seconds must be from %d to %d (auth.token_ttl), got %d",
				int64(minTokenTTL/time.Second), int64(p.tokenTTL/time.Second), s)
		}
		ttl = time.Duration(s) * time.Second
	}
	if p.isMember(id) {
		return apiErr(CodeInvalidDeviceID, "%q is the name of a cluster member: a device with that client ID would take over its connection", id)
	}
	tok, exp, err := p.issuer.issue(id, ttl, time.Now())
	if err != nil {
		return apiErr(CodeInvalidDeviceID, "no token for %q: %v", id, err)
	}
	return c.JSON(http.StatusCreated, DeviceToken{ClientID: id, Username: id, Token: tok, ExpiresAt: exp.UTC()})
}

// isMember reports whether name is a gossip member's name (the push API's
// own MQTT client ID among them).
func (p *PushAPI) isMember(name string) bool {
	if name == p.cfg.Name {
		return true
	}
	for _, m := range p.members() {
		if m.Name == name {
			return true
		}
	}
	return false
}

// deleteDeviceConnection is DELETE /v1/devices/{id}/connection: the broker
// of the device's last connection disconnects it (MQTT 5: DISCONNECT 0x98,
// administrative action). Its session, if persistent, stays.
func (p *PushAPI) deleteDeviceConnection(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	var pr store.Presence
	err = p.withStore(c, func(ctx context.Context) (err error) {
		pr, err = p.st.Presence(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	if !pr.Seen {
		return apiErr(CodeNotFound, "device %q was never connected", id)
	}
	admin, ok := brokerAdmin(p.members(), pr.Node)
	if !ok {
		return apiErr(CodeNotConnected, "device %q is not connected (its last broker, %s, is gone)", id, pr.Node)
	}
	// Ask even when the record says offline: records are written
	// asynchronously, the broker knows.
	err = p.admin.disconnect(c.Request().Context(), admin, id)
	switch {
	case err == nil:
		return c.NoContent(http.StatusNoContent)
	case errors.Is(err, errUnknownClient):
		return apiErr(CodeNotConnected, "device %q is not connected", id)
	}
	return &Error{Status: http.StatusServiceUnavailable, Code: CodeNodeUnavailable, cause: err,
		Message: "broker " + pr.Node + " did not answer; retry"}
}
