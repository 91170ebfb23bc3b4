package pushapi_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

// TestChannelSubscriptions: a push channel reaches every subscriber,
// however it subscribed: over MQTT, through the API while connected to
// another node, through the API while offline with a persistent session
// (the message waits in the session), and through the API before it ever
// connected (applied when it connects). Unsubscribing through the API
// works for both kinds.
func TestChannelSubscriptions(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	bs := startCluster(t, 2, st)
	b0, b1 := bs[0], bs[1]
	api := startAPI(t, b0.GossipAddr(), st, nil)
	api.waitBroker()
	persistent := func(id string, clean bool) *paho.Connect {
		// RequestProblemInfo: paho sends 0 when it is false, and the broker
		// then drops user properties from PUBLISH too (see
		// TestMessageIDWithoutProblemInfo).
		return &paho.Connect{ClientID: id, CleanStart: clean, Properties: &paho.ConnectProperties{
			SessionExpiryInterval: ptr(uint32(300)), RequestProblemInfo: true}}
	}

	// mqtt-dev subscribes itself, on b0.
	viaMQTT := testutil.MustV5(t, b0.Addr(broker.ListenerTCP), "mqtt-dev")
	viaMQTT.Sub(t, "push/news", 1)
	// online-dev is connected to b1 and subscribed through the API.
	online := testutil.MustV5(t, b1.Addr(broker.ListenerTCP), "online-dev")
	api.waitPresence("online-dev", true, "b1")
	var sub pushapi.ChannelSubscription
	api.expect(http.MethodPut, "/v1/devices/online-dev/channels/news", nil, http.StatusCreated, &sub)
	if sub.Applied != pushapi.AppliedNow || sub.Via != "api" || sub.Device != "online-dev" || sub.Channel != "news" {
		t.Fatalf("PUT for a connected device: %+v, want applied now via api", sub)
	}
	api.expect(http.MethodPut, "/v1/devices/online-dev/channels/news", nil, http.StatusOK, &sub) // idempotent
	// offline-dev has a persistent session on b1 and is away.
	c, _, err := testutil.DialV5(t, b1.Addr(broker.ListenerTCP), persistent("offline-dev", true))
	if err != nil {
		t.Fatal(err)
	}
	api.waitPresence("offline-dev", true, "b1")
	_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	api.waitPresence("offline-dev", false, "b1")
	api.expect(http.MethodPut, "/v1/devices/offline-dev/channels/news", nil, http.StatusCreated, &sub)
	if sub.Applied != pushapi.AppliedNow {
		t.Errorf("PUT for an offline persistent session: applied %q, want now (its session holds it)", sub.Applied)
	}
	// new-dev never connected.
	api.expect(http.MethodPut, "/v1/devices/new-dev/channels/news", nil, http.StatusCreated, &sub)
	if sub.Applied != pushapi.AppliedAtNextConnect {
		t.Errorf("PUT for a device never seen: applied %q, want at_next_connect", sub.Applied)
	}

	// The subscribers, a page at a time (mqtt-dev's record is written by
	// its broker, asynchronously).
	want := []string{"mqtt-dev", "new-dev", "offline-dev", "online-dev"}
	testutil.WaitFor(t, waitCond, func() error {
		var got []string
		cursor := ""
		for range 10 {
			var page pushapi.Subscribers
			api.expect(http.MethodGet, "/v1/channels/news/subscribers?limit=1&cursor="+cursor, nil, http.StatusOK, &page)
			for _, s := range page.Subscribers {
				got = append(got, s.Device)
				if wantVia := map[bool]string{true: "mqtt", false: "api"}[s.Device == "mqtt-dev"]; s.Via != wantVia || s.Since.IsZero() {
					return fmt.Errorf("subscriber %+v, want via %s", s, wantVia)
				}
			}
			if page.NextCursor == nil {
				break
			}
			cursor = *page.NextCursor
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("subscribers %v, want %v", got, want)
		}
		return nil
	})

	waitRoutes(t, b0, "b1", 1) // push/news: online-dev, offline-dev's session
	waitRoutes(t, b1, "b0", 1) // push/news: mqtt-dev
	var p pushapi.Published
	api.expect(http.MethodPost, "/v1/channels/news/messages", map[string]any{"payload": "extra!"}, http.StatusOK, &p)
	for _, c := range []*testutil.V5{viaMQTT, online} {
		if m := nextOn(t, c, "push/news"); messageID(m) != p.ID {
			t.Fatalf("%s got %s, want %s", c.ClientID(), messageID(m), p.ID)
		}
	}
	// offline-dev comes back and finds it waiting.
	back, ca, err := testutil.DialV5(t, b1.Addr(broker.ListenerTCP), persistent("offline-dev", false))
	if err != nil || !ca.SessionPresent {
		t.Fatalf("reconnect offline-dev: %v, session present %v", err, ca)
	}
	if m := nextOn(t, back, "push/news"); messageID(m) != p.ID {
		t.Fatalf("offline-dev got %s, want %s", messageID(m), p.ID)
	}
	// new-dev connects (to b0) and its broker applies the subscription.
	fresh := testutil.MustV5(t, b0.Addr(broker.ListenerTCP), "new-dev")
	testutil.WaitFor(t, waitCond, func() error {
		api.expect(http.MethodPost, "/v1/channels/news/messages", map[string]any{"payload": "for new-dev"}, http.StatusOK, nil)
		select {
		case m := <-fresh.Messages:
			if m.Topic != "push/news" {
				return fmt.Errorf("new-dev got a message on %s", m.Topic)
			}
			return nil
		case <-time.After(100 * time.Millisecond): // poll interval
			return fmt.Errorf("new-dev receives nothing on push/news: its subscription was not applied at connect")
		}
	})

	// Unsubscribe: one made through the API, one made over MQTT.
	api.expect(http.MethodDelete, "/v1/devices/online-dev/channels/news", nil, http.StatusNoContent, nil)
	api.expect(http.MethodDelete, "/v1/devices/mqtt-dev/channels/news", nil, http.StatusNoContent, nil)
	api.expectError(http.MethodDelete, "/v1/devices/mqtt-dev/channels/news", nil, http.StatusNotFound, pushapi.CodeNotFound)
	d, _ := api.device("online-dev")
	if len(d.Channels) != 0 {
		t.Errorf("online-dev still has channels %+v", d.Channels)
	}
	for len(fresh.Messages) > 0 {
		<-fresh.Messages
	}
	for _, c := range []*testutil.V5{viaMQTT, online, back} {
		for len(c.Messages) > 0 {
			<-c.Messages
		}
	}
	api.expect(http.MethodPost, "/v1/channels/news/messages", map[string]any{"payload": "after"}, http.StatusOK, &p)
	if m := nextOn(t, fresh, "push/news"); messageID(m) != p.ID { // still subscribed
		t.Fatalf("new-dev got %s, want %s", messageID(m), p.ID)
	}
	nextOn(t, back, "push/news")
	// mqtt-dev is on new-dev's node, online-dev on back's: had they kept
	// their subscriptions, the message would have reached them by now.
	viaMQTT.None(t, 100*time.Millisecond)
	online.None(t, 0)
}

// TestPresenceAndKick: presence follows the device's connection, and a kick
// disconnects it (MQTT 5: DISCONNECT 0x98).
func TestPresenceAndKick(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	bs := startCluster(t, 2, st)
	api := startAPI(t, bs[0].GossipAddr(), st, nil)

	before := time.Now().Add(-time.Second)
	dev := testutil.MustV5(t, bs[1].Addr(broker.ListenerTCP), "kick-me")
	d := api.waitPresence("kick-me", true, "b1")
	if d.ID != "kick-me" || d.Since == nil || d.Since.Before(before) || d.LastSeen == nil || d.Channels == nil {
		t.Fatalf("presence %+v", d)
	}
	api.expect(http.MethodDelete, "/v1/devices/kick-me/connection", nil, http.StatusNoContent, nil)
	select {
	case dp := <-dev.Disconnects:
		if dp.ReasonCode != 0x98 {
			t.Errorf("kicked with reason 0x%02X, want 0x98 (administrative action)", dp.ReasonCode)
		}
	case <-time.After(waitMsg):
		t.Fatal("the device was not disconnected")
	}
	d = api.waitPresence("kick-me", false, "b1")
	if d.LastSeen == nil || d.LastSeen.Before(*d.Since) {
		t.Errorf("last_seen %v before since %v", d.LastSeen, d.Since)
	}
	api.expectError(http.MethodDelete, "/v1/devices/kick-me/connection", nil, http.StatusNotFound, pushapi.CodeNotConnected)
	api.expectError(http.MethodDelete, "/v1/devices/never-seen/connection", nil, http.StatusNotFound, pushapi.CodeNotFound)
}

// TestDeviceToken: a token from the push API lets the device connect to a
// broker that requires tokens; the push API connects to it with its own
// service token.
func TestDeviceToken(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	b := startBroker(t, "tb", "", st, func(o *broker.Options) {
		o.Auth = config.Auth{Devices: "token", TokenKeys: tokenKey}
	})
	api := startAPI(t, b.GossipAddr(), st, nil)

	var tok pushapi.DeviceToken
	now := time.Now()
	api.expect(http.MethodPost, "/v1/devices/dev-7/token", map[string]any{"ttl_seconds": 600}, http.StatusCreated, &tok)
	if tok.ClientID != "dev-7" || tok.Username != "dev-7" || tok.Token == "" ||
		tok.ExpiresAt.Before(now.Add(598*time.Second)) || tok.ExpiresAt.After(now.Add(602*time.Second)) {
		t.Fatalf("token %+v, want dev-7 expiring in 600 s", tok)
	}
	var def pushapi.DeviceToken
	api.expect(http.MethodPost, "/v1/devices/dev-8/token", nil, http.StatusCreated, &def)
	if d := time.Until(def.ExpiresAt); d < 59*time.Minute || d > time.Hour {
		t.Errorf("default token lifetime %v, want auth.token_ttl (1h)", d)
	}

	addr := b.Addr(broker.ListenerTCP)
	connect := func(id, user, pass string) (*paho.Connack, error) {
		_, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: id, CleanStart: true,
			Username: user, UsernameFlag: true, Password: []byte(pass), PasswordFlag: true})
		return ca, err
	}
	if _, err := connect("dev-7", "dev-7", tok.Token); err != nil {
		t.Fatalf("connect with the issued token: %v (waits for plugins: the broker's token auth)", err)
	}
	if ca, err := connect("dev-8", "dev-8", tok.Token); err == nil || ca == nil || (ca.ReasonCode != 0x86 && ca.ReasonCode != 0x87) {
		t.Errorf("dev-7's token as dev-8: %v %v, want refused 0x86/0x87", ca, err)
	}
	if ca, err := connect("dev-7", "dev-7", tok.Token+"x"); err == nil || ca == nil || ca.ReasonCode != 0x86 && ca.ReasonCode != 0x87 {
		t.Errorf("a forged token: %v %v, want refused 0x86/0x87", ca, err)
	}
	// The push API's service token.
	if name := api.waitBroker(); name != "tb" {
		t.Fatalf("push API connected to %q", name)
	}
	api.publish(map[string]any{"topic": "devices/dev-7/inbox", "payload": "x"})
}

// TestAdminKeyToBrokers (issue 12 item 4): the push API subscribes and
// kicks devices through the brokers' admin endpoints with the admin key of
// its configuration. With a key the brokers do not hold, both fail with
// 503 node_unavailable and change nothing; with theirs, both work.
func TestAdminKeyToBrokers(t *testing.T) {
	t.Parallel()
	st := storetest.Open(t)
	bs := startCluster(t, 1, st)
	wrong := startAPI(t, bs[0].GossipAddr(), st, func(o *pushapi.Options) {
		o.Config.Name, o.AdminKey = "api-wrong-key", "not-the-brokers-admin-key"
	})
	dev := testutil.MustV5(t, bs[0].Addr(broker.ListenerTCP), "keyed-dev")
	wrong.waitPresence("keyed-dev", true, "b0")
	// The device's broker applies the device's recorded push subscriptions
	// once after its connect, behind the presence write: let that pass, or
	// it may apply the record the failed PUT below leaves (rightly). A
	// subscription the device makes now is written by the same writer
	// after it, so once the store shows it, the re-apply is done.
	dev.Sub(t, "push/sentinel", 1)
	testutil.WaitFor(t, waitCond, func() error {
		d, _ := wrong.device("keyed-dev")
		if !slices.ContainsFunc(d.Channels, func(c pushapi.DeviceChannel) bool { return c.Channel == "sentinel" }) {
			return fmt.Errorf("channels %v, want sentinel recorded", d.Channels)
		}
		return nil
	})

	wrong.expectError(http.MethodPut, "/v1/devices/keyed-dev/channels/alerts", nil, http.StatusServiceUnavailable, pushapi.CodeNodeUnavailable)
	wrong.expectError(http.MethodDelete, "/v1/devices/keyed-dev/connection", nil, http.StatusServiceUnavailable, pushapi.CodeNodeUnavailable)
	// Neither took effect: the device is connected and not subscribed.
	wrong.expect(http.MethodPost, "/v1/channels/alerts/messages", map[string]any{"payload": "not for keyed-dev"}, http.StatusOK, nil)
	dev.None(t, 500*time.Millisecond)
	select {
	case d := <-dev.Disconnects:
		t.Fatalf("kicked (0x%02X) by a push API with a wrong admin key", d.ReasonCode)
	default:
	}

	good := startAPI(t, bs[0].GossipAddr(), st, nil)
	var sub pushapi.ChannelSubscription
	good.expect(http.MethodPut, "/v1/devices/keyed-dev/channels/alerts", nil, http.StatusOK, &sub) // recorded by the failed PUT
	if sub.Applied != pushapi.AppliedNow {
		t.Fatalf("PUT with the admin key: applied %q, want now", sub.Applied)
	}
	var p pushapi.Published
	good.expect(http.MethodPost, "/v1/channels/alerts/messages", map[string]any{"payload": "keyed"}, http.StatusOK, &p)
	if m := nextOn(t, dev, "push/alerts"); messageID(m) != p.ID {
		t.Fatalf("device got %s, want %s", messageID(m), p.ID)
	}
	good.expect(http.MethodDelete, "/v1/devices/keyed-dev/connection", nil, http.StatusNoContent, nil)
	select {
	case d := <-dev.Disconnects:
		if d.ReasonCode != 0x98 {
			t.Errorf("kicked with reason 0x%02X, want 0x98", d.ReasonCode)
		}
	case <-time.After(waitMsg):
		t.Fatal("the device was not disconnected by the push API with the admin key")
	}
}
