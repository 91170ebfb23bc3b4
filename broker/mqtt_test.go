package broker_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

var protocols = []string{"v5", "v3"}

// binaryPayload is a payload with every byte value, so any re-encoding,
// truncation or text handling on the way shows.
func binaryPayload(label string) []byte {
	p := []byte(label + ":")
	for i := 0; i < 1024; i++ {
		p = append(p, byte(i))
	}
	return p
}

// TestPubSubQoS publishes at QoS 0, 1 and 2 to subscriptions at QoS 0, 1
// and 2, for MQTT 5 and 3.1.1: each message arrives once, intact, at the
// lower of the two QoS levels [MQTT-3.8.4-8].
func TestPubSubQoS(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	for _, proto := range protocols {
		for pubQoS := byte(0); pubQoS <= 2; pubQoS++ {
			for subQoS := byte(0); subQoS <= 2; subQoS++ {
				name := fmt.Sprintf("%s/pub%d/sub%d", proto, pubQoS, subQoS)
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					id := strings.ReplaceAll(name, "/", "-")
					sub := newClient(t, proto, addr, id+"-sub")
					pub := newClient(t, proto, addr, id+"-pub")
					topic := "qos/" + name
					sub.sub(t, topic, subQoS)

					payload := binaryPayload(name)
					pub.pub(t, topic, pubQoS, false, payload)
					// A second message in the same flow: if the first were
					// delivered twice, the copy would come before it.
					pub.pub(t, topic, pubQoS, false, []byte("end"))
					m := expectNext(t, sub, topic, payload)
					if want := min(pubQoS, subQoS); m.qos != want {
						t.Errorf("delivered at QoS %d, want %d", m.qos, want)
					}
					if m.retain {
						t.Error("live message delivered with the retain flag")
					}
					expectNext(t, sub, topic, []byte("end"))
				})
			}
		}
	}
}

// TestWildcards checks single-level + and multi-level # filters, including
// the edge cases of the spec: + matches an empty level, # matches its parent
// [MQTT-4.7.1-2], and neither crosses levels it should not.
func TestWildcards(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	pub := v5{testutil.MustV5(t, addr, "wc-pub")}
	cases := []struct {
		name, filter string
		match, miss  []string
	}{
		{"plus", "w1/+/c", []string{"w1/b/c", "w1//c", "w1/x/c"}, []string{"w1/b/d", "w1/b/c/d", "w1/c", "w1/b"}},
		{"plus-last", "w2/+", []string{"w2/a", "w2/"}, []string{"w2", "w2/a/b", "x/w2/a"}},
		{"hash", "w3/#", []string{"w3", "w3/a", "w3/a/b/c", "w3/"}, []string{"w3x", "x/w3", "w4/a"}},
		{"plus-hash", "w5/+/x/#", []string{"w5/a/x", "w5/b/x/y/z"}, []string{"w5/a/y", "w5/x"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sub := v5{testutil.MustV5(t, addr, "wc-sub-"+tc.name)}
			sub.sub(t, tc.filter, 1)
			// Every miss is published before every match, so a miss that
			// were delivered would arrive before the first match.
			for _, topic := range tc.miss {
				pub.pub(t, topic, 1, false, []byte("miss "+topic))
			}
			for _, topic := range tc.match {
				pub.pub(t, topic, 1, false, []byte("match "+topic))
			}
			for _, topic := range tc.match {
				expectNext(t, sub, topic, []byte("match "+topic))
			}
		})
	}
}

// TestRetained sets, replaces and clears a retained message: a new
// subscriber gets the current one with the retain flag, a live subscriber
// gets updates without it, and after an empty retained payload a new
// subscriber gets nothing [MQTT-3.3.1-6, -10, -11].
func TestRetained(t *testing.T) {
	t.Parallel()
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			b, _ := startBroker(t, nil)
			addr := b.Addr(broker.ListenerTCP)
			topic := "retained/" + proto
			// mochi's $SYS topics are retained messages too.
			base := b.Stats().Retained
			retained := func(want int64) {
				t.Helper()
				testutil.WaitFor(t, waitCond, func() error {
					if got := b.Stats().Retained - base; got != want {
						return fmt.Errorf("retained messages besides $SYS = %d, want %d", got, want)
					}
					return nil
				})
			}
			// newSub subscribes a new client and expects exactly the
			// retained message want (none if nil): a message the client
			// publishes to itself afterwards is handled after its
			// SUBSCRIBE, retained delivery included, so it comes next.
			newSub := func(id string, want []byte) client {
				t.Helper()
				c := newClient(t, proto, addr, id)
				c.sub(t, topic, 1)
				if want != nil {
					if m := expectNext(t, c, topic, want); !m.retain {
						t.Errorf("%s: retained message delivered without the retain flag", id)
					}
				}
				mark := "mark/" + id
				c.sub(t, mark, 1)
				c.pub(t, mark, 1, false, []byte("mark"))
				expectNext(t, c, mark, []byte("mark"))
				return c
			}

			// retain publishes a retained message and returns once the
			// broker has also handed it to the live subscribers: mochi
			// acknowledges a PUBLISH before it fans it out, and a client
			// subscribing in between would get it twice, retained and live.
			pub := newClient(t, proto, addr, proto+"-ret-pub")
			pubMark := "mark/" + proto + "-ret-pub"
			pub.sub(t, pubMark, 1)
			retain := func(payload []byte) {
				t.Helper()
				pub.pub(t, topic, 1, true, payload)
				pub.pub(t, pubMark, 1, false, []byte("mark"))
				expectNext(t, pub, pubMark, []byte("mark"))
			}

			retain([]byte("one"))
			retained(1)
			live := newSub(proto+"-ret-1", []byte("one"))

			retain([]byte("two"))
			if m := expectNext(t, live, topic, []byte("two")); m.retain {
				t.Error("update to a live subscriber carries the retain flag") // [MQTT-3.3.1-9]
			}
			retained(1)
			newSub(proto+"-ret-2", []byte("two")) // "two" only: "one" was replaced

			retain(nil)
			expectNext(t, live, topic, nil) // an empty retained message is delivered normally
			retained(0)
			newSub(proto+"-ret-3", nil)
		})
	}
}

// TestWill checks the will message: published when the connection ends
// without DISCONNECT, and for v5 on DISCONNECT 0x04; not published on a
// normal DISCONNECT [MQTT-3.1.2-8, -10].
func TestWill(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	watcher := v5{testutil.MustV5(t, addr, "will-watcher")}
	watcher.sub(t, "will/#", 1)
	waitConnections(t, b, 1)

	v5will := func(t *testing.T, topic string) *testutil.V5 {
		// A client ID is one topic level: brokers refuse '/' in it.
		c, _, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: strings.ReplaceAll(topic, "/", "-"), CleanStart: true,
			WillMessage: &paho.WillMessage{Topic: topic, QoS: 1, Payload: []byte("gone " + topic)}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// v3will returns a v3.1.1 client with a will and its TCP connection.
	v3will := func(t *testing.T, topic string) (*testutil.V3, func() net.Conn) {
		var conn net.Conn
		c, _, _, err := dialV3(t, "tcp://"+addr, strings.ReplaceAll(topic, "/", "-"), func(o *mqtt3.ClientOptions) {
			o.SetWill(topic, "gone "+topic, 1, false)
			o.SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt3.ClientOptions) (net.Conn, error) {
				var err error
				conn, err = net.DialTimeout("tcp", u.Host, waitMsg)
				return conn, err
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		return c, func() net.Conn { return conn }
	}
	cases := []struct {
		name string
		end  func(t *testing.T, topic string)
		will bool
	}{
		{"v5-abrupt", func(t *testing.T, topic string) { _ = v5will(t, topic).Conn.Close() }, true},
		{"v3-abrupt", func(t *testing.T, topic string) { _, conn := v3will(t, topic); _ = conn().Close() }, true},
		{"v5-disconnect-with-will", func(t *testing.T, topic string) {
			_ = v5will(t, topic).Disconnect(&paho.Disconnect{ReasonCode: 0x04})
		}, true},
		{"v5-disconnect", func(t *testing.T, topic string) { _ = v5will(t, topic).Disconnect(&paho.Disconnect{}) }, false},
		{"v3-disconnect", func(t *testing.T, topic string) { c, _ := v3will(t, topic); c.Disconnect(250) }, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			topic := "will/" + tc.name
			tc.end(t, topic)
			// The will is published before the broker counts the client
			// gone, so once it is gone a will would already be queued to
			// the watcher, ahead of the watcher's own message.
			waitConnections(t, b, 1)
			if tc.will {
				if m := expectNext(t, watcher, topic, []byte("gone "+topic)); m.qos != 1 {
					t.Errorf("will delivered at QoS %d, want 1", m.qos)
				}
			}
			watcher.pub(t, "will/after/"+tc.name, 1, false, []byte("after"))
			expectNext(t, watcher, "will/after/"+tc.name, []byte("after"))
		})
	}
}

// TestPersistentSession disconnects a subscriber with a persistent session,
// publishes 20 QoS 1 messages while it is away, and expects all of them, in
// order, when it comes back [MQTT-3.1.2-4, -5] [MQTT-4.6.0-6].
func TestPersistentSession(t *testing.T) {
	t.Parallel()
	const n = 20
	offline := func(t *testing.T, b *broker.Broker, topic string) {
		t.Helper()
		waitConnections(t, b, 0)
		pub := v5{testutil.MustV5(t, b.Addr(broker.ListenerTCP), "publisher")}
		for i := 0; i < n; i++ {
			pub.pub(t, topic, 1, false, []byte(fmt.Sprint(i)))
		}
	}
	check := func(t *testing.T, c client, topic string) {
		t.Helper()
		var got, want []string
		for i := 0; i < n; i++ {
			want = append(want, fmt.Sprint(i))
		}
		for len(got) < n {
			m, ok := c.within(waitMsg)
			if !ok {
				break
			}
			if m.topic != topic || m.qos != 1 {
				t.Errorf("received %v, want QoS 1 on %s", m, topic)
			}
			got = append(got, string(m.payload))
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("offline messages delivered as %v, want %v in order", got, want)
		}
	}

	t.Run("v5", func(t *testing.T) {
		t.Parallel()
		b, _ := startBroker(t, nil)
		addr := b.Addr(broker.ListenerTCP)
		sei := uint32(300)
		cp := func() *paho.Connect {
			return &paho.Connect{ClientID: "persistent", Properties: &paho.ConnectProperties{SessionExpiryInterval: &sei}}
		}
		c, ca, err := testutil.DialV5(t, addr, cp())
		if err != nil {
			t.Fatal(err)
		}
		if ca.SessionPresent {
			t.Fatal("first CONNACK: session present, want a new session")
		}
		c.Sub(t, "persist/v5", 1)
		if err := c.Disconnect(&paho.Disconnect{}); err != nil {
			t.Fatal(err)
		}
		offline(t, b, "persist/v5")
		if got := b.Stats().Sessions; got != 2 {
			t.Errorf("sessions = %d, want 2 (the offline one and the publisher)", got)
		}

		c, ca, err = testutil.DialV5(t, addr, cp())
		if err != nil {
			t.Fatal(err)
		}
		if !ca.SessionPresent {
			t.Fatal("reconnect CONNACK: no session present")
		}
		check(t, v5{c}, "persist/v5")
	})

	t.Run("v3", func(t *testing.T) {
		t.Parallel()
		b, _ := startBroker(t, nil)
		url := "tcp://" + b.Addr(broker.ListenerTCP)
		persistent := func(o *mqtt3.ClientOptions) { o.SetCleanSession(false) }
		c, present, _, err := dialV3(t, url, "persistent", persistent)
		if err != nil {
			t.Fatal(err)
		}
		if present {
			t.Fatal("first CONNACK: session present, want a new session")
		}
		v3{c}.sub(t, "persist/v3", 1)
		c.Disconnect(250)
		offline(t, b, "persist/v3")

		c, present, _, err = dialV3(t, url, "persistent", persistent)
		if err != nil {
			t.Fatal(err)
		}
		if !present {
			t.Fatal("reconnect CONNACK: no session present")
		}
		check(t, v3{c}, "persist/v3")
	})
}

// TestSessionExpiry lets a v5 session with a 1 s expiry interval lapse: the
// broker forgets it and its subscriptions, so a reconnect finds no session
// and gets no messages for the old subscription [MQTT-3.1.2-23].
func TestSessionExpiry(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	connect := func(sei uint32) (*testutil.V5, *paho.Connack) {
		t.Helper()
		c, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: "expiring",
			Properties: &paho.ConnectProperties{SessionExpiryInterval: &sei}})
		if err != nil {
			t.Fatal(err)
		}
		return c, ca
	}
	c, _ := connect(1)
	c.Sub(t, "expire/old", 1)
	if err := c.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if st := b.Stats(); st.Sessions != 0 || st.Subscriptions != 0 {
			return fmt.Errorf("sessions = %d, subscriptions = %d; want 0 and 0 after the session expired", st.Sessions, st.Subscriptions)
		}
		return nil
	})

	c, ca := connect(60)
	if ca.SessionPresent {
		t.Fatal("CONNACK after expiry: session present")
	}
	c.Sub(t, "expire/new", 1)
	// The old subscription must be gone with its session.
	cl := v5{c}
	cl.pub(t, "expire/old", 1, false, []byte("old"))
	cl.pub(t, "expire/new", 1, false, []byte("new"))
	expectNext(t, cl, "expire/new", []byte("new"))
}

// TestSessionExpiryCap: a v5 client asking for a longer session than
// broker.session_expiry_max is told the cap in its CONNACK (3.2.2.3.2).
func TestSessionExpiryCap(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, func(c *config.Broker) { c.SessionExpiry = time.Hour })
	for _, tc := range []struct {
		ask  uint32
		want *uint32
	}{{100000, ptr(uint32(3600))}, {60, nil}} {
		_, ca, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: fmt.Sprint("cap-", tc.ask),
			CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &tc.ask}})
		if err != nil {
			t.Fatal(err)
		}
		got := ca.Properties.SessionExpiryInterval
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("asked %d s: CONNACK Session Expiry Interval %v, want %v", tc.ask, deref(got), deref(tc.want))
		}
	}
}

// TestV5PropertiesPassThrough: the properties of a v5 PUBLISH reach a v5
// subscriber unchanged, user properties in order with duplicates
// [MQTT-3.3.2-17, -18], and the message expiry counts down [MQTT-3.3.2-6].
func TestV5PropertiesPassThrough(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	sub := testutil.MustV5(t, addr, "props-sub")
	sub.Sub(t, "props/x", 1)
	pub := testutil.MustV5(t, addr, "props-pub")
	expiry, format := uint32(120), byte(1)
	sent := &paho.PublishProperties{
		ContentType:     "application/json",
		ResponseTopic:   "props/reply",
		CorrelationData: []byte{0, 1, 2, 0xff},
		MessageExpiry:   &expiry,
		PayloadFormat:   &format,
		User:            paho.UserProperties{{Key: "k1", Value: "v1"}, {Key: "k2", Value: "v2"}, {Key: "k1", Value: "v3"}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
	defer cancel()
	if _, err := pub.Publish(ctx, &paho.Publish{Topic: "props/x", QoS: 1, Payload: []byte(`{"a":1}`), Properties: sent}); err != nil {
		t.Fatal(err)
	}
	m := sub.Next(t, waitMsg)
	got := m.Properties
	if got == nil {
		t.Fatal("message without properties")
	}
	if got.ContentType != sent.ContentType || got.ResponseTopic != sent.ResponseTopic || !bytes.Equal(got.CorrelationData, sent.CorrelationData) {
		t.Errorf("content type %q, response topic %q, correlation data %x; want %q, %q, %x",
			got.ContentType, got.ResponseTopic, got.CorrelationData, sent.ContentType, sent.ResponseTopic, sent.CorrelationData)
	}
	if !reflect.DeepEqual(got.User, sent.User) {
		t.Errorf("user properties %v, want %v", got.User, sent.User)
	}
	if got.PayloadFormat == nil || *got.PayloadFormat != 1 {
		t.Errorf("payload format %v, want 1", deref(got.PayloadFormat))
	}
	if got.MessageExpiry == nil || *got.MessageExpiry == 0 || *got.MessageExpiry > expiry {
		t.Errorf("message expiry %v, want 1..%d", deref(got.MessageExpiry), expiry)
	}
}

// TestNoLocal: a subscription with No Local gets others' messages but not
// the client's own [MQTT-3.8.3-3].
func TestNoLocal(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	c := testutil.MustV5(t, addr, "nolocal")
	other := v5{testutil.MustV5(t, addr, "nolocal-other")}
	ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
	defer cancel()
	if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
		{Topic: "nl/x", QoS: 1, NoLocal: true}, {Topic: "nl/mark", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	cl := v5{c}
	cl.pub(t, "nl/x", 1, false, []byte("own"))
	cl.pub(t, "nl/mark", 1, false, []byte("mark")) // handled after "own"
	expectNext(t, cl, "nl/mark", []byte("mark"))
	other.pub(t, "nl/x", 1, false, []byte("other"))
	expectNext(t, cl, "nl/x", []byte("other"))
}

// TestRetainAsPublished: with Retain As Published a live subscriber sees the
// publisher's retain flag; without it the flag is cleared [MQTT-3.3.1-12,
// -13].
func TestRetainAsPublished(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	subscribe := func(id string, rap bool) v5 {
		c := testutil.MustV5(t, addr, id)
		ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
		defer cancel()
		if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
			{Topic: "rap/x", QoS: 1, RetainAsPublished: rap}}}); err != nil {
			t.Fatal(err)
		}
		return v5{c}
	}
	withRAP, without := subscribe("rap-on", true), subscribe("rap-off", false)
	pub := v5{testutil.MustV5(t, addr, "rap-pub")}
	pub.pub(t, "rap/x", 1, true, []byte("r"))
	pub.pub(t, "rap/x", 1, false, []byte("n"))
	if m := expectNext(t, withRAP, "rap/x", []byte("r")); !m.retain {
		t.Error("retain as published: retained message arrived without the retain flag")
	}
	if m := expectNext(t, withRAP, "rap/x", []byte("n")); m.retain {
		t.Error("retain as published: non-retained message arrived with the retain flag")
	}
	if m := expectNext(t, without, "rap/x", []byte("r")); m.retain {
		t.Error("without retain as published: live message arrived with the retain flag")
	}
	expectNext(t, without, "rap/x", []byte("n"))
}

// TestSubscriptionIdentifiers: a message carries the identifier of the
// subscription it matched, and none for a subscription without one
// [MQTT-3.3.4-3].
func TestSubscriptionIdentifiers(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	addr := b.Addr(broker.ListenerTCP)
	c := testutil.MustV5(t, addr, "subid")
	ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
	defer cancel()
	for _, s := range []struct {
		filter string
		id     *int
	}{{"sid/a/#", ptr(7)}, {"sid/b/+", ptr(268435455)}, {"sid/c", nil}} {
		sp := &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: s.filter, QoS: 1}}}
		if s.id != nil {
			sp.Properties = &paho.SubscribeProperties{SubscriptionIdentifier: s.id}
		}
		if _, err := c.Subscribe(ctx, sp); err != nil {
			t.Fatal(err)
		}
	}
	pub := v5{testutil.MustV5(t, addr, "subid-pub")}
	for _, tc := range []struct {
		topic string
		want  *int
	}{{"sid/a/1/2", ptr(7)}, {"sid/b/1", ptr(268435455)}, {"sid/c", nil}} {
		pub.pub(t, tc.topic, 1, false, []byte(tc.topic))
		m := c.Next(t, waitMsg)
		var got *int
		if m.Properties != nil {
			got = m.Properties.SubscriptionIdentifier
		}
		if m.Topic != tc.topic || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("message on %s: subscription identifier %v, want %s with %v", m.Topic, deref(got), tc.topic, deref(tc.want))
		}
	}
}

func ptr[T any](v T) *T { return &v }

// deref formats an optional value for messages.
func deref[T any](p *T) any {
	if p == nil {
		return "none"
	}
	return *p
}
