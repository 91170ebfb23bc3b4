package plugins

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/plugins/token"
)

// Options configures the hooks of Hooks.
type Options struct {
	// Auth is the auth section of the configuration. An empty Devices means
	// "token".
	Auth config.Auth
	// Logger receives refused connections (Info, rate-limited) and ACL
	// denials (Debug). Nil discards.
	Logger *slog.Logger
	// Groups answers group membership for groups/{id}; nil closes group
	// topics to devices (a broker without a store).
	Groups Membership
}

// Hooks returns the hooks that authenticate devices and enforce topic
// rights for opts.Auth; the broker adds them in order, each with a nil
// config. (Never both an allow-all hook and real auth: mochi ORs auth
// hooks.) Every configuration error is reported, each naming its key.
func Hooks(opts Options) ([]mqtt.Hook, error) {
	h := new(AuthHook)
	if err := h.configure(opts); err != nil {
		return nil, err
	}
	return []mqtt.Hook{h}, nil
}

// authLogPerSecond bounds the lines logged about refused connections, so a
// flood of bad CONNECTs cannot fill the log; the next line logged says how
// many were left out.
const authLogPerSecond = 10

// maxLoggedID is how much of a client ID a log line shows: client IDs come
// from the network and may be 64 KiB long.
const maxLoggedID = 128

// AuthHook authenticates clients at CONNECT and decides what they may
// publish, subscribe to and receive. Build it with Hooks (or add a new one
// with a *Options config).
//
// Authentication, with auth.devices=token: the username must equal the
// client ID and the password must be an unexpired token for that client ID
// (a service token for a service's own name). With auth.devices=anonymous
// every client is accepted, and one presenting such a token gets its
// identity (so the push API's service token works in `rtm dev`). In both
// modes a client ID must be one topic level (token.CheckClientID), a will
// must be a topic the client may publish to, and a connection authenticated
// by a token is closed when the token expires.
//
// Topic rights, first match wins: services may do anything; then the rules
// of auth.acl; then the built-in namespace of SPEC section 3 for devices:
// devices/{id}/inbox is read by that device only and written by no device;
// push/... is read by any device and written by none; groups/{id}/... is
// read and written by the group's members (Options.Groups); $SYS/... is closed (the
// broker's own) and no device publishes to a $share/... topic; everything
// else, other $ topics included, is open. Subscription filters with wildcards are
// granted where a match could be allowed, because every delivery is checked
// again against its topic.
type AuthHook struct {
	mqtt.HookBase

	log        *slog.Logger
	signer     *token.Signer // nil: anonymous without keys
	anonymous  bool
	rules      []aclRule
	ruleUser   bool       // some rule uses %u
	groups     Membership // nil: group topics closed to devices
	configured bool

	// Each authenticated connection's identity and expiry timer are on its
	// client (authSlot) until it disconnects. A client without one (an
	// offline persistent session, one adopted from another node) is
	// checked as the device its client ID names.
	//
	// byID maps a client ID to the *mqtt.Client holding its identity, so
	// a newer connection with the same ID demotes the older one (see
	// remember). It is touched at connect and disconnect only.
	byIDMu sync.Mutex
	byID   map[string]*mqtt.Client

	limit logLimiter
}

// authSlot holds each connection's *connAuth (rtm's mochi patch 106): a
// pointer on the client instead of entries in three sync.Maps, about 0.4
// KiB less per connection and one atomic load per ACL check. One slot for
// every AuthHook of the process: a client belongs to one server.
var authSlot = mqtt.NewClientSlot[connAuth]()

// connAuth is what the hook keeps for one connection.
type connAuth struct {
	id identity // set at OnConnect, then only read
	// plain: a newer connection with the same client ID took the identity
	// over; until this one goes it is checked as a plain device.
	plain atomic.Bool
	// timer closes a connection authenticated by a token when the token
	// expires, from its CONNACK until it disconnects.
	timer atomic.Pointer[time.Timer]
}

// identity is who a connection is.
type identity struct {
	clientID      string
	username      string
	service       bool      // rtm's own service: every right
	authenticated bool      // by a token; false: an anonymous device
	expires       time.Time // the token's expiry, when authenticated
}

func (h *AuthHook) configure(opts Options) error {
	var errs []error
	keys := opts.Auth.Keys()
	var signer *token.Signer
	switch opts.Auth.Devices {
	case "", "token":
		if len(keys) == 0 {
			errs = append(errs, errors.New("auth.token_keys: required with auth.devices=token"))
		}
	case "anonymous":
	default:
		errs = append(errs, fmt.Errorf("auth.devices: %q: want token or anonymous", opts.Auth.Devices))
	}
	if len(keys) > 0 {
		s, err := token.NewSigner(keys)
		if err != nil {
			errs = append(errs, fmt.Errorf("auth.token_keys: %w", err))
		}
		signer = s
	}
	rules, err := parseACL(opts.Auth.ACL)
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	h.signer, h.anonymous = signer, opts.Auth.Devices == "anonymous"
	h.rules, h.ruleUser = rules, usesUsername(rules)
	h.groups = opts.Groups
	h.log = opts.Logger
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	h.log = h.log.With("component", "auth")
	h.configured = true
	return nil
}

// ID returns the hook's ID, "rtm-auth".
func (h *AuthHook) ID() string { return "rtm-auth" }

// Provides reports the events the hook handles: OnConnect,
// OnConnectAuthenticate, OnSessionEstablished, OnACLCheck and OnDisconnect.
func (h *AuthHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablished, mqtt.OnACLCheck, mqtt.OnDisconnect:
		return true
	}
	return false
}

// Init accepts a nil config for a hook made by Hooks, or a *Options to
// configure a new one.
func (h *AuthHook) Init(config any) error {
	switch c := config.(type) {
	case nil:
		if !h.configured {
			return errors.New("rtm-auth: not configured: build it with plugins.Hooks or pass *plugins.Options")
		}
		return nil
	case *Options:
		if c != nil {
			return h.configure(*c)
		}
	}
	return mqtt.ErrInvalidConfigType
}

// OnConnect checks a CONNECT: its client ID, its credentials and its will.
// mochi calls it before OnConnectAuthenticate and, when it fails, sends no
// CONNACK: refusals with a code of their own are answered here.
//
//   - A client ID that cannot be one topic level (token.CheckClientID: '/',
//     '+', '#', a leading '$') is refused with CONNACK 0x85 (v3.1.1: 2,
//     identifier rejected), in both auth modes: it would be a level of its
//     inbox and of the %c of auth.acl.
//   - Bad credentials leave no identity: OnConnectAuthenticate then refuses
//     and mochi answers 0x86 (v3.1.1: 5).
//   - A will the client could not publish as a PUBLISH is refused with 0x87
//     (v3.1.1: 5, not authorized): mochi would send it without any ACL
//     check, as the client's message, when the connection drops.
func (h *AuthHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if err := token.CheckClientID(cl.ID); err != nil { // an empty one was replaced by an assigned ID
		h.logRefusal(cl, "connection refused", err.Error())
		return refuse(cl, packets.ErrClientIdentifierNotValid)
	}
	a := &connAuth{id: identity{clientID: cl.ID, username: cl.ID}}
	if string(pk.Connect.Username) != cl.ID { // with tokens it must be the client ID: no copy
		a.id.username = string(pk.Connect.Username)
	}
	id := &a.id
	if h.anonymous {
		if h.signer != nil && len(pk.Connect.Password) > 0 {
			if c, why := h.verify(cl, pk); why == "" {
				id.service, id.authenticated, id.expires = c.Service, true, c.Expires
			} else {
				h.logRefusal(cl, "token ignored, connecting as an anonymous device", why)
			}
		}
	} else {
		c, why := h.verify(cl, pk)
		if why != "" {
			h.logRefusal(cl, "connection refused", why)
			return nil // OnConnectAuthenticate refuses: no identity
		}
		id.service, id.authenticated, id.expires = c.Service, true, c.Expires
	}
	if w := &cl.Properties.Will; w.Flag != 0 && !id.service {
		if ok, why := h.check(id, w.TopicName, true); !ok {
			h.logRefusal(cl, "connection refused: will topic not allowed", why)
			return refuse(cl, packets.ErrNotAuthorized)
		}
	}
	h.remember(cl, a)
	return nil
}

// refuse answers a CONNECT with code, mapped to its MQTT 3.1.1 return code
// for an older client, and returns it for mochi to end the connection.
func refuse(cl *mqtt.Client, code packets.Code) error {
	ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code.Code}
	if cl.Properties.ProtocolVersion < 5 {
		switch code {
		case packets.ErrClientIdentifierNotValid:
			ack.ReasonCode = packets.Err3ClientIdentifierNotValid.Code
		default:
			ack.ReasonCode = packets.Err3NotAuthorized.Code
		}
	} else {
		ack.Properties.ReasonString = code.Reason
	}
	_ = cl.WritePacket(ack)
	return code
}

// OnConnectAuthenticate accepts a CONNECT that OnConnect gave an identity;
// refused, mochi answers CONNACK 0x86 (v5) or 5 (v3.1.1).
func (h *AuthHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	a := authSlot.Load(cl)
	return a != nil && !a.plain.Load()
}

// OnSessionEstablished starts the expiry of a connection authenticated by a
// token, now that its CONNACK is sent: when the token expires the
// connection is closed (MQTT 5: DISCONNECT 0xA0, maximum connect time), as
// if it had been refused at CONNECT by then. A timer, not a goroutine, per
// connection; OnDisconnect stops it.
func (h *AuthHook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	var exp time.Time
	a := authSlot.Load(cl)
	if a != nil && !a.plain.Load() {
		if !a.id.authenticated {
			return
		}
		exp = a.id.expires
	} else if h.signer != nil && len(pk.Connect.Password) > 0 {
		// A newer connection with the same client ID took the identity
		// (see remember) and may yet fail, leaving this one up: the token
		// bounds it all the same.
		c, err := h.signer.Verify(string(pk.Connect.Password), time.Now())
		switch {
		case err == nil && c.ClientID == cl.ID:
			exp = c.Expires
		case errors.Is(err, token.ErrTokenExpired) && !h.anonymous:
			exp = time.Now()
		default:
			return // anonymous: an unusable token was ignored
		}
	} else {
		return
	}
	if a == nil {
		a = &connAuth{}
		a.plain.Store(true)
		if !authSlot.CompareAndSwap(cl, nil, a) {
			a = authSlot.Load(cl)
		}
	}
	if a == nil {
		return // disconnected meanwhile
	}
	t := time.AfterFunc(time.Until(exp), func() { h.expire(cl) })
	if old := a.timer.Swap(t); old != nil {
		old.Stop()
	}
	if authSlot.Load(cl) != a { // OnDisconnect ran meanwhile and missed the timer
		if t := a.timer.Swap(nil); t != nil {
			t.Stop()
		}
	}
}

// expire disconnects cl, whose token has expired. The connection ends as
// any the server closes: its will, if it has one, is published
// [MQTT-3.1.2-8] (it was allowed at CONNECT, by the same rules).
func (h *AuthHook) expire(cl *mqtt.Client) {
	if a := authSlot.Load(cl); a != nil {
		a.timer.Store(nil)
	}
	h.logRefusal(cl, "token expired: disconnecting", "expired token")
	if cl.Properties.ProtocolVersion >= 5 {
		// MQTT 3.1.1 has no DISCONNECT from the server: closing says it.
		_ = cl.WritePacket(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
			ReasonCode:  packets.ErrMaxConnectTime.Code,
			Properties:  packets.Properties{ReasonString: "token expired"},
		})
	}
	cl.Stop(packets.ErrMaxConnectTime)
}

// verify checks the CONNECT's credentials against a token; why says what is
// wrong, "" if nothing.
func (h *AuthHook) verify(cl *mqtt.Client, pk packets.Packet) (c token.Claims, why string) {
	switch {
	case !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0:
		return c, "no token"
	case pk.Connect.ClientIdentifier == "":
		return c, "empty client ID"
	case string(pk.Connect.Username) != cl.ID:
		return c, "username must equal the client ID"
	}
	c, err := h.signer.Verify(string(pk.Connect.Password), time.Now())
	switch {
	case errors.Is(err, token.ErrTokenExpired):
		return c, "expired token"
	case errors.Is(err, token.ErrTokenUnknownKey):
		return c, "unknown key"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return c, "bad signature"
	case err != nil:
		return c, "malformed token"
	case c.ClientID != cl.ID:
		return c, "token for another client"
	}
	return c, ""
}

func (h *AuthHook) remember(cl *mqtt.Client, a *connAuth) {
	authSlot.Store(cl, a)
	h.byIDMu.Lock()
	if h.byID == nil {
		h.byID = map[string]*mqtt.Client{}
	}
	old := h.byID[cl.ID]
	h.byID[cl.ID] = cl
	h.byIDMu.Unlock()
	if old != nil && old != cl {
		// An older connection with this ID: mochi is taking it over, or
		// lost it before its CONNACK. Until it goes it is a plain device.
		if oa := authSlot.Load(old); oa != nil {
			oa.plain.Store(true)
		}
	}
}

// OnDisconnect forgets the connection's identity and stops its expiry.
func (h *AuthHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if a := authSlot.Swap(cl, nil); a != nil {
		if t := a.timer.Swap(nil); t != nil {
			t.Stop()
		}
	}
	h.byIDMu.Lock()
	if h.byID[cl.ID] == cl {
		delete(h.byID, cl.ID)
	}
	h.byIDMu.Unlock()
}

// OnACLCheck reports whether cl may publish to topic (write) or subscribe to
// the filter topic, or receive a message on topic (!write). mochi calls it
// for every delivery, so the path for an allowed topic allocates nothing.
func (h *AuthHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true // the broker's own client
	}
	var fallback identity
	id := &fallback
	if a := authSlot.Load(cl); a != nil && !a.plain.Load() {
		id = &a.id
	} else {
		fallback.clientID = cl.ID
		if h.ruleUser {
			fallback.username = string(cl.Properties.Username)
		}
	}
	if id.service {
		return true
	}
	ok, why := h.check(id, topic, write)
	if !ok && h.log.Enabled(context.Background(), slog.LevelDebug) {
		h.log.Debug("acl denied", "client_id", truncate(id.clientID), "anonymous", !id.authenticated,
			"topic", topic, "write", write, "reason", why)
	}
	return ok
}

func (h *AuthHook) logRefusal(cl *mqtt.Client, msg, why string) {
	ok, left := h.limit.allow(time.Now())
	if !ok {
		return
	}
	args := []any{"client_id", truncate(cl.ID), "remote", cl.Net.Remote, "reason", why}
	if left > 0 {
		args = append(args, "not_logged", left)
	}
	h.log.Info(msg, args...)
}

func truncate(s string) string {
	if len(s) <= maxLoggedID {
		return s
	}
	n := maxLoggedID
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// logLimiter lets through at most authLogPerSecond lines per second and
// counts the rest.
type logLimiter struct {
	mu     sync.Mutex
	second int64
	n      int
	left   int // lines not logged since the last one that was
}

// allow reports whether a line may be logged now and, if so, how many were
// left out before it.
func (l *logLimiter) allow(now time.Time) (ok bool, left int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := now.Unix(); s != l.second {
		l.second, l.n = s, 0
	}
	if l.n >= authLogPerSecond {
		l.left++
		return false, 0
	}
	l.n++
	left, l.left = l.left, 0
	return true, left
}

// Interface guards.
var _ mqtt.Hook = (*AuthHook)(nil)
