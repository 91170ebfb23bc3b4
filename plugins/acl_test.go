package plugins_test

import (
	"log/slog"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/plugins"
)

// Who is asking, in the ACL tables.
const (
	alice   = "alice"   // a device with a token
	svc     = "pushapi" // the push API, with a service token
	offline = "offline" // alice's session without a connection (no identity held)
	inline  = "inline"  // the broker's inline client
	carol   = "carol"   // an anonymous device with username carol-user
	dave    = "dave"    // an anonymous device without a username
)

// Kinds of check, as mochi makes them.
const (
	pub     = "pub"     // PUBLISH: OnACLCheck(cl, topic, true)
	sub     = "sub"     // SUBSCRIBE: OnACLCheck(cl, filter, false)
	deliver = "deliver" // delivery: OnACLCheck(cl, topic, false)
)

type aclCase struct {
	who, kind, subject string
	want               bool
}

// clients connects alice and the push API to h (which must accept their
// tokens) and returns the clients by name.
func clients(t *testing.T, h mqtt.Hook, auth config.Auth) map[string]*mqtt.Client {
	t.Helper()
	s := newSigner(t, auth.Keys()...)
	m := map[string]*mqtt.Client{}
	var ok bool
	if m[alice], ok = connect(h, alice, alice, deviceToken(t, s, alice)); !ok {
		t.Fatal("alice refused")
	}
	if m[svc], ok = connect(h, svc, svc, serviceToken(t, s, svc)); !ok {
		t.Fatal("service refused")
	}
	m[offline] = &mqtt.Client{ID: alice}
	m[inline] = &mqtt.Client{ID: "inline"}
	m[inline].Net.Inline = true
	return m
}

func runACL(t *testing.T, h mqtt.Hook, cls map[string]*mqtt.Client, cases []aclCase) {
	t.Helper()
	for _, tc := range cases {
		cl := cls[tc.who]
		if cl == nil {
			t.Fatalf("no client %q", tc.who)
		}
		if got := h.OnACLCheck(cl, tc.subject, tc.kind == pub); got != tc.want {
			t.Errorf("%s %s %s = %v, want %v", tc.who, tc.kind, tc.subject, got, tc.want)
		}
	}
}

func TestACLBuiltin(t *testing.T) {
	auth := tokenAuth("")
	h := hook(t, auth, testLogger(t))
	cls := clients(t, h, auth)
	runACL(t, h, cls, []aclCase{
		// devices/{id}/inbox: read your own only; nobody publishes but the push API.
		{alice, sub, "devices/alice/inbox", true},
		{alice, deliver, "devices/alice/inbox", true},
		{alice, sub, "devices/bob/inbox", false},
		{alice, deliver, "devices/bob/inbox", false},
		{alice, sub, "devices/+/inbox", true}, // deliveries are checked per topic
		{alice, sub, "devices/#", true},
		{alice, sub, "devices/bob/#", true},
		{alice, sub, "devices/bob/+", true},
		{alice, sub, "+/bob/inbox", true},
		{alice, sub, "#", true},
		{alice, pub, "devices/alice/inbox", false},
		{alice, pub, "devices/bob/inbox", false},
		{alice, pub, "devices/alice/status", true}, // not an inbox
		{alice, deliver, "devices/bob/status", true},
		{alice, pub, "devices/alice/inbox/x", true},
		{alice, pub, "devices", true},
		// push/{channel}: anyone reads, only the push API publishes.
		{alice, sub, "push/news", true},
		{alice, sub, "push/#", true},
		{alice, sub, "push/+", true},
		{alice, deliver, "push/news", true},
		{alice, pub, "push/news", false},
		{alice, pub, "push/news/extra", false},
		{alice, pub, "push", false},
		// groups: closed to devices without a membership source (no store).
		{alice, sub, "groups/g1", false},
		{alice, sub, "groups/#", false},
		{alice, deliver, "groups/g1", false},
		{alice, pub, "groups/g1", false},
		{alice, sub, "+/g1", true}, // deliveries of groups/g1 are still refused
		// $SYS belongs to the broker (in any letter case); other $ topics
		// are open, as in Mosquitto (SPEC section 3 reserves $SYS only).
		{alice, sub, "$SYS/#", false},
		{alice, sub, "$SYS/broker/uptime", false},
		{alice, deliver, "$SYS/broker/uptime", false},
		{alice, pub, "$SYS/broker/uptime", false},
		{alice, pub, "$SYS", false},
		{alice, pub, "$sys/broker/uptime", false},
		{alice, sub, "$Sys/#", false},
		{alice, pub, "$other", true},
		{alice, pub, "$TopicA/B", true},
		{alice, sub, "$TopicA/#", true},
		{alice, deliver, "$TopicA/B", true},
		{alice, pub, "$share/g/sensors", false}, // the prefix of shared subscriptions
		{alice, pub, "", false},
		// An empty first level is an ordinary topic.
		{alice, pub, "/TopicA", true},
		{alice, sub, "/#", true},
		{alice, deliver, "/TopicA", true},
		// Shared subscriptions are checked as the filter they share.
		{alice, sub, "$share/g/push/news", true},
		{alice, sub, "$share/g/sensors/#", true},
		{alice, sub, "$share/g/devices/bob/inbox", false},
		{alice, sub, "$share/g/devices/alice/inbox", true},
		{alice, sub, "$share/g/$SYS/#", false},
		{alice, sub, "$share/g", false},
		// Everything else is open.
		{alice, sub, "sensors/+/temp", true},
		{alice, pub, "sensors/alice/temp", true},
		{alice, deliver, "sensors/bob/temp", true},
		// The push API may do anything.
		{svc, pub, "devices/bob/inbox", true},
		{svc, pub, "push/news", true},
		{svc, pub, "groups/g1", true},
		{svc, sub, "groups/#", true},
		{svc, sub, "devices/bob/inbox", true},
		{svc, sub, "$SYS/#", true},
		{svc, pub, "$SYS/x", true},
		// A session without an identity (offline, or adopted from another
		// node) is the device its client ID names.
		{offline, deliver, "devices/alice/inbox", true},
		{offline, deliver, "devices/bob/inbox", false},
		{offline, deliver, "push/news", true},
		{offline, deliver, "groups/g1", false},
		// The broker's inline client is not restricted.
		{inline, deliver, "$SYS/broker/uptime", true},
		{inline, pub, "devices/bob/inbox", true},
	})
}

func TestACLRules(t *testing.T) {
	auth := config.Auth{Devices: "anonymous", TokenKeys: keyA, ACL: "allow sub $SYS/#; deny pub sensors/%c/secret; " +
		"allow pub devices/+/inbox ; deny all users/%u/locked;allow sub private/%c/#; deny sub private/#; " +
		"deny all dev-%c-x/#;; allow all groups/public/#"}
	h := hook(t, auth, testLogger(t))
	cls := clients(t, h, auth)
	var ok bool
	if cls[carol], ok = connect(h, carol, "carol-user", ""); !ok {
		t.Fatal("carol refused")
	}
	if cls[dave], ok = connect(h, dave, "", ""); !ok {
		t.Fatal("dave refused")
	}
	runACL(t, h, cls, []aclCase{
		// allow sub $SYS/#: subscribing to it and below, and deliveries.
		{alice, sub, "$SYS/#", true},
		{alice, sub, "$SYS/broker/clients/+", true},
		{alice, deliver, "$SYS/broker/uptime", true},
		{alice, pub, "$SYS/broker/uptime", false}, // a sub rule
		// deny pub sensors/%c/secret
		{alice, pub, "sensors/alice/secret", false},
		{alice, pub, "sensors/bob/secret", true},
		{alice, sub, "sensors/alice/secret", true},
		{carol, pub, "sensors/carol/secret", false},
		// allow pub devices/+/inbox: publishing, not reading others' inboxes.
		{alice, pub, "devices/bob/inbox", true},
		{alice, sub, "devices/bob/inbox", false},
		{alice, deliver, "devices/bob/inbox", false},
		// deny all users/%u/locked: the username, not the client ID.
		{carol, pub, "users/carol-user/locked", false},
		{carol, sub, "users/carol-user/locked", false},
		{carol, pub, "users/carol/locked", true},
		{dave, pub, "users//locked", true}, // an empty username matches nothing
		{alice, pub, "users/alice/locked", false},
		// allow sub private/%c/#; deny sub private/#
		{alice, sub, "private/alice/#", true},
		{alice, deliver, "private/alice/x", true},
		{alice, sub, "private/bob/#", false},
		{alice, sub, "private/+/x", false}, // the filter read as a topic: "+" is not alice
		{alice, deliver, "private/bob/x", false},
		{alice, pub, "private/bob/x", true}, // sub rules only
		// deny all dev-%c-x/#: placeholders inside a level.
		{alice, pub, "dev-alice-x/a/b", false},
		{alice, sub, "dev-alice-x", false},
		{alice, pub, "dev-bob-x/a", true},
		{alice, pub, "dev-alice-xy/a", true},
		// allow all groups/public/#: rules come before the built-in ones.
		{alice, pub, "groups/public/chat", true},
		{alice, sub, "groups/public/#", true},
		{alice, sub, "groups/#", false},
		{alice, sub, "groups/g1", false},
		// Services are above the rules.
		{svc, pub, "sensors/pushapi/secret", true},
	})

	// A catch-all rule overrides every built-in rule (an operator's choice),
	// but like any MQTT filter starting with a wildcard it does not match
	// $ topics [MQTT-4.7.2-1].
	auth = config.Auth{Devices: "anonymous", ACL: "deny pub push/private; allow all #"}
	h = hook(t, auth, testLogger(t))
	if cls[alice], ok = connect(h, alice, "", ""); !ok {
		t.Fatal("alice refused")
	}
	runACL(t, h, cls, []aclCase{
		{alice, pub, "push/news", true},
		{alice, pub, "push/private", false},
		{alice, sub, "groups/g1", true},
		{alice, sub, "devices/bob/inbox", true},
		{alice, deliver, "devices/bob/inbox", true},
		{alice, sub, "$SYS/#", false},
		{alice, deliver, "$SYS/broker/uptime", false},
		{alice, pub, "$other", true}, // "#" does not match it: the built-in rule opens it
	})

	// A rule naming a $ topic does match it.
	auth = config.Auth{Devices: "anonymous", ACL: "deny all $private/#"}
	h = hook(t, auth, testLogger(t))
	if cls[alice], ok = connect(h, alice, "", ""); !ok {
		t.Fatal("alice refused")
	}
	runACL(t, h, cls, []aclCase{
		{alice, pub, "$private/x", false},
		{alice, sub, "$private/#", false},
		{alice, pub, "$public/x", true},
	})
}

func TestHooksConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		auth config.Auth
		want []string // substrings of the error; none for success
	}{
		{"token", tokenAuth(""), nil},
		{"token by default", config.Auth{TokenKeys: keyA}, nil},
		{"anonymous without keys", config.Auth{Devices: "anonymous"}, nil},
		{"anonymous with keys", config.Auth{Devices: "anonymous", TokenKeys: keyA + "," + keyB}, nil},
		{"token without keys", config.Auth{Devices: "token"}, []string{"auth.token_keys: required"}},
		{"unknown mode", config.Auth{Devices: "password"}, []string{`auth.devices: "password"`}},
		{"short key", config.Auth{Devices: "anonymous", TokenKeys: "short"}, []string{"auth.token_keys: token: key 1 is 5 bytes"}},
		{"bad rules, all reported", config.Auth{TokenKeys: keyA, ACL: "allow sub; permit pub a; allow read a; deny all a/#/b; deny all a+; allow pub a b c"}, []string{
			`auth.acl: rule "allow sub"`, `rule "permit pub a": "permit"`, `rule "allow read a": "read"`,
			`rule "deny all a/#/b": '#' must be the last level`, `rule "deny all a+"`, `rule "allow pub a b c"`}},
		{"everything wrong", config.Auth{Devices: "x", TokenKeys: "k", ACL: "nope"}, []string{"auth.devices", "auth.token_keys", "auth.acl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs, err := plugins.Hooks(plugins.Options{Auth: tc.auth})
			if len(tc.want) == 0 {
				if err != nil || len(hs) != 1 || hs[0].ID() != "rtm-auth" {
					t.Fatalf("Hooks = %v, %v", hs, err)
				}
				return
			}
			if err == nil {
				t.Fatal("Hooks succeeded")
			}
			for _, w := range tc.want {
				if !contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub))
}

func TestHookProvides(t *testing.T) {
	h := hook(t, config.Auth{Devices: "anonymous"}, nil)
	for b := byte(0); b <= mqtt.StoredSysInfo; b++ {
		want := b == mqtt.OnConnect || b == mqtt.OnConnectAuthenticate || b == mqtt.OnSessionEstablished ||
			b == mqtt.OnACLCheck || b == mqtt.OnDisconnect
		if h.Provides(b) != want {
			t.Errorf("Provides(%d) = %v, want %v", b, !want, want)
		}
	}
	if err := new(plugins.AuthHook).Init(nil); err == nil {
		t.Error("Init(nil) of an unconfigured hook succeeded")
	}
	if err := new(plugins.AuthHook).Init("config"); err != mqtt.ErrInvalidConfigType {
		t.Errorf("Init(string) = %v, want ErrInvalidConfigType", err)
	}
	if err := new(plugins.AuthHook).Init((*plugins.Options)(nil)); err != mqtt.ErrInvalidConfigType {
		t.Errorf("Init(nil *Options) = %v, want ErrInvalidConfigType", err)
	}
	h2 := new(plugins.AuthHook)
	if err := h2.Init(&plugins.Options{Auth: config.Auth{Devices: "anonymous"}}); err != nil {
		t.Fatalf("Init(*Options) = %v", err)
	}
	if _, ok := connect(h2, "x", "", ""); !ok {
		t.Error("anonymous hook configured by Init refused a client")
	}
}

// TestACLDeliveryAllocs guards the hot path: a delivery check of an
// ordinary topic, or of the device's own inbox, allocates nothing.
func TestACLDeliveryAllocs(t *testing.T) {
	auth := tokenAuth("deny pub sensors/%c/secret; allow sub $SYS/broker/#")
	h := hook(t, auth, slog.New(slog.DiscardHandler))
	cls := clients(t, h, auth)
	for _, topic := range []string{"sensors/room1/temp", "devices/alice/inbox", "push/news", "devices/bob/inbox"} {
		for _, who := range []string{alice, offline} {
			if n := testing.AllocsPerRun(100, func() { h.OnACLCheck(cls[who], topic, false) }); n != 0 {
				t.Errorf("%s delivery of %s: %v allocations", who, topic, n)
			}
		}
	}
}

// BenchmarkACLDelivery measures the check mochi makes for every message it
// delivers.
func BenchmarkACLDelivery(b *testing.B) {
	for _, bc := range []struct {
		name, acl, who, topic string
	}{
		{"ordinary", "", alice, "sensors/room1/temp"},
		{"own-inbox", "", alice, "devices/alice/inbox"},
		{"push", "", alice, "push/news"},
		{"denied-inbox", "", alice, "devices/bob/inbox"},
		{"ordinary-3-rules", "deny pub sensors/%c/secret; allow sub $SYS/#; deny all private/%u/#", alice, "sensors/room1/temp"},
		{"offline-session", "", offline, "sensors/room1/temp"},
		{"service", "", svc, "sensors/room1/temp"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			auth := tokenAuth(bc.acl)
			h := hook(b, auth, slog.New(slog.DiscardHandler))
			s := newSigner(b, keyA)
			cl, _ := connect(h, alice, alice, deviceToken(b, s, alice))
			switch bc.who {
			case svc:
				cl, _ = connect(h, svc, svc, serviceToken(b, s, svc))
			case offline:
				cl = &mqtt.Client{ID: alice}
			}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					h.OnACLCheck(cl, bc.topic, false)
				}
			})
		})
	}
}
