package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/rtm-dev/rtm/internal/testutil"
)

func u32(v uint32) *uint32 { return &v }

// persistV5 connects an MQTT 5 client with clean start false and a session
// expiry, and returns it with its CONNACK's session present flag.
func persistV5(t *testing.T, addr, id string, expiry uint32) (*testutil.V5, bool) {
	t.Helper()
	c, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: id, CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(expiry)}})
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	return c, ca.SessionPresent
}

// persistV3 connects an MQTT 3.1.1 client with clean session false.
func persistV3(t *testing.T, addr, id string) (*testutil.V3, bool) {
	t.Helper()
	c := &testutil.V3{Messages: make(chan mqtt3.Message, 10000)}
	o := mqtt3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetCleanSession(false).
		SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) { c.Messages <- m }).SetOrderMatters(true)
	c.Client = mqtt3.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("v3 connect %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, tok.(*mqtt3.ConnectToken).SessionPresent()
}

// durablePayload is message i of the restart test: its sequence number,
// then filler up to a size between 1 byte and 8 KiB.
func durablePayload(i int) string {
	p := fmt.Sprintf("m%05d:", i)
	return p + strings.Repeat("x", (i*797)%(8<<10))
}

func payloadSeq(t *testing.T, p []byte) int {
	t.Helper()
	s, _, _ := strings.Cut(string(p), ":")
	n, err := strconv.Atoi(strings.TrimPrefix(s, "m"))
	if err != nil {
		t.Fatalf("unexpected payload %.20q", p)
	}
	return n
}

// TestRestartRestoresDurableState: retained messages, persistent sessions
// (MQTT 5 and 3.1.1, subscription options included) and the QoS 1
// messages queued for them, acknowledged to their publisher, survive a
// kill -9 (and a SIGTERM) of the node and its restart on the same data
// directory: each subscriber reconnects with session present and gets
// every message once, in order. A session whose expiry passed while the
// node was down is not restored, and its messages are counted
// (session_expired).
func TestRestartRestoresDurableState(t *testing.T) {
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
		msgs int
	}{{"kill9", syscall.SIGKILL, 1000}, {"sigterm", syscall.SIGTERM, 200}} {
		t.Run(tc.name, func(t *testing.T) { testRestart(t, tc.sig, tc.msgs) })
	}
}

func testRestart(t *testing.T, sig syscall.Signal, msgs int) {
	data := t.TempDir()
	args := append([]string{"broker", "--data", data, "--node-name", "d1"}, loopbackFlags...)
	p := start(t, nil, args...)
	addr := p.listeners(t)["tcp"]

	// Subscribers: MQTT 5 with options, MQTT 3.1.1; both offline while the
	// messages are published.
	s5, _ := persistV5(t, addr, "sub5", 3600)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s5.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{
		{Topic: "q/#", QoS: 1},
		{Topic: "nl/#", QoS: 1, NoLocal: true},
		{Topic: "rap/#", QoS: 1, RetainAsPublished: true},
		{Topic: "q0/#", QoS: 0},
	}}); err != nil {
		t.Fatal(err)
	}
	_ = s5.Disconnect(&paho.Disconnect{})
	s3, _ := persistV3(t, addr, "sub3")
	testutil.Wait(t, s3.Subscribe("q/#", 1, nil))
	s3.Disconnect(100)

	pub := testutil.MustV5(t, addr, "pub")
	for i := range 100 {
		pub.Pub(t, fmt.Sprintf("r/%d", i), 1, true, fmt.Sprintf("retained %d", i))
	}
	for i := range msgs {
		pub.Pub(t, fmt.Sprintf("q/%d", i%7), 1, false, durablePayload(i))
	}

	// A session that expires while the node is down, holding 10 messages.
	short, _ := persistV5(t, addr, "short", 2)
	short.Sub(t, "s/#", 1)
	_ = short.Disconnect(&paho.Disconnect{})
	shortGone := time.Now()
	for i := range 10 {
		pub.Pub(t, "s/x", 1, false, strconv.Itoa(i))
	}

	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGTERM {
		if code := p.wait(t, 30*time.Second); code != 0 {
			t.Fatalf("exit code %d after SIGTERM", code)
		}
	} else {
		p.wait(t, 10*time.Second)
	}
	// The short session's expiry (2 s) passes while the node is down.
	time.Sleep(time.Until(shortGone.Add(3 * time.Second)))

	p2 := start(t, nil, args...)
	l2 := p2.listeners(t)
	addr = l2["tcp"]

	// Retained messages.
	rc := testutil.MustV5(t, addr, "retained-reader")
	rc.Sub(t, "r/#", 1)
	got := map[string]string{}
	for len(got) < 100 {
		m := rc.Next(t, 20*time.Second)
		got[m.Topic] = string(m.Payload)
	}
	for i := range 100 {
		if want := fmt.Sprintf("retained %d", i); got[fmt.Sprintf("r/%d", i)] != want {
			t.Fatalf("r/%d = %q after restart, want %q", i, got[fmt.Sprintf("r/%d", i)], want)
		}
	}

	// MQTT 5 subscriber: session present, every message once, in order.
	s5, present := persistV5(t, addr, "sub5", 3600)
	if !present {
		t.Fatal("sub5: session present = 0 after restart")
	}
	for i := range msgs {
		m := s5.Next(t, 30*time.Second)
		if n := payloadSeq(t, m.Payload); n != i {
			t.Fatalf("sub5: message %d is #%d (want in order, none twice)", i, n)
		}
		if want := durablePayload(i); string(m.Payload) != want {
			t.Fatalf("sub5: message %d has %d bytes, want %d", i, len(m.Payload), len(want))
		}
	}
	// Its subscription options survived: No Local, Retain As Published,
	// QoS 0.
	s5.Pub(t, "nl/self", 1, false, "own")
	pub2 := testutil.MustV5(t, addr, "pub2")
	pub2.Pub(t, "rap/x", 1, true, "kept-flag")
	pub2.Pub(t, "q0/x", 1, false, "downgraded")
	for range 2 {
		m := s5.Next(t, 10*time.Second)
		switch m.Topic {
		case "rap/x":
			if !m.Retain {
				t.Fatal("rap/x arrived without its retain flag: Retain As Published lost")
			}
		case "q0/x":
			if m.QoS != 0 {
				t.Fatalf("q0/x arrived at QoS %d, want 0 (subscription QoS lost)", m.QoS)
			}
		default:
			t.Fatalf("unexpected %s %q (No Local lost?)", m.Topic, m.Payload)
		}
	}
	s5.None(t, 300*time.Millisecond)

	// MQTT 3.1.1 subscriber.
	s3, present = persistV3(t, addr, "sub3")
	if !present {
		t.Fatal("sub3: session present = 0 after restart")
	}
	for i := range msgs {
		select {
		case m := <-s3.Messages:
			if n := payloadSeq(t, m.Payload()); n != i {
				t.Fatalf("sub3: message %d is #%d", i, n)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("sub3: %d of %d messages", i, msgs)
		}
	}

	// The expired session is gone and its messages counted.
	_, present = persistV5(t, addr, "short", 2)
	if present {
		t.Fatal("short: session present after its expiry passed")
	}
	st := brokerStats(t, l2["admin"])
	if n := st.DroppedByReason["session_expired"]["1"]; n != 10 {
		t.Fatalf("session_expired drops = %d, want 10 (%v)", n, st.DroppedByReason)
	}
}
