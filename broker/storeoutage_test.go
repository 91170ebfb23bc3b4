package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// outageStore is an embedded store on a fixed loopback port that a test can
// stop and start again (same port, same data), and a Store connected to it.
type outageStore struct {
	t    *testing.T
	addr string
	dir  string
	e    *store.Embedded
	st   *store.Store
}

func newOutageStore(t *testing.T) *outageStore {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &outageStore{t: t, addr: ln.Addr().String(), dir: t.TempDir()}
	_ = ln.Close()
	o.start()
	ctx := testutil.Context(t, waitCond)
	if o.st, err = store.Open(ctx, store.Options{URI: o.e.URI(), Database: storetest.DBName(t)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = o.st.Close(ctx)
		if o.e != nil {
			_ = o.e.Close(ctx)
		}
	})
	return o
}

func (o *outageStore) start() {
	o.t.Helper()
	var err error
	o.e, err = store.StartEmbedded(testutil.Context(o.t, waitCond), store.EmbeddedOptions{Addr: o.addr, DataDir: o.dir})
	if err != nil {
		o.t.Fatal(err)
	}
}

func (o *outageStore) stop() {
	o.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitCond)
	defer cancel()
	if err := o.e.Close(ctx); err != nil {
		o.t.Fatal(err)
	}
	o.e = nil
}

// readyz returns /readyz's status and body.
func readyz(t *testing.T, b *broker.Broker) (int, broker.Readiness) {
	t.Helper()
	resp, err := http.Get("http://" + b.Addr(broker.ListenerAdmin) + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r broker.Readiness
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("/readyz body %q: %v", body, err)
	}
	return resp.StatusCode, r
}

// TestStoreOutage: with the store gone, the broker stays ready (/readyz 200,
// the store reported down), devices that connect are served at once, and
// when the store returns the presence and push subscriptions of the outage
// are written: a device that left is offline, those that came are online,
// and a push subscription recorded for one of them is applied.
func TestStoreOutage(t *testing.T) {
	o := newOutageStore(t)
	log, logs := testutil.Logger(t)
	t.Cleanup(logs.Stop)
	b := testcluster.Broker(t, "outage-node", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store, opts.Auth.TokenKeys = "", o.st, testTokenKey
		opts.Logger = log
	})
	ctx := testutil.Context(t, 4*waitCond)
	dialV5(t, b, &paho.Connect{ClientID: "stays", CleanStart: true})
	leaves, _ := dialV5(t, b, &paho.Connect{ClientID: "leaves", CleanStart: true})
	waitPresence(t, o.st, "stays", true)
	waitPresence(t, o.st, "leaves", true)
	if _, err := o.st.AddPushSubscription(ctx, "arrives", "alerts", store.ViaAPI); err != nil {
		t.Fatal(err)
	}
	if code, r := readyz(t, b); code != http.StatusOK || r.Store != "up" {
		t.Fatalf("/readyz with the store up: %d %+v", code, r)
	}

	o.stop()
	_ = leaves.Disconnect(&paho.Disconnect{})
	// A new device's first round trip does not wait for the store.
	start := time.Now()
	arrives, _ := dialV5(t, b, &paho.Connect{ClientID: "arrives", CleanStart: true})
	subscribe(t, arrives, 0, paho.SubscribeOptions{Topic: "rt/arrives", QoS: 1})
	arrives.Pub(t, "rt/arrives", 1, false, "ping")
	select {
	case <-arrives.Messages:
	case <-time.After(waitMsg):
		t.Fatal("no round trip")
	}
	took := time.Since(start)
	t.Logf("CONNECT, SUBSCRIBE, PUBLISH round trip with the store down: %v", took)
	if took > time.Second {
		t.Errorf("CONNECT, SUBSCRIBE and PUBLISH round trip took %v with the store down, want well under the store timeouts", took)
	}
	var more []string
	for i := range 20 {
		id := fmt.Sprintf("outage-%d", i)
		dialV5(t, b, &paho.Connect{ClientID: id, CleanStart: true})
		more = append(more, id)
	}

	// Ready for MQTT; the store reported down, with the writes it holds.
	testutil.WaitFor(t, waitCond, func() error {
		code, r := readyz(t, b)
		if code != http.StatusOK || r.Store != "down" || r.Status != "ready" {
			return fmt.Errorf("/readyz: %d %+v, want 200 ready with the store down", code, r)
		}
		s := b.Stats().Store
		if s == nil || s.Up || s.Pending == 0 {
			return fmt.Errorf("stats: store %+v, want down with pending writes", s)
		}
		return nil
	})
	// The outage is said once, not once per device that connects in it.
	if n := logs.Count("level=WARN", "store"); n != 1 {
		t.Errorf("%d WARN lines about the store for one outage and 22 connects, want 1", n)
	}
	metrics := getText(t, "http://"+b.Addr(broker.ListenerAdmin)+"/metrics")
	if !strings.Contains(metrics, "rtm_broker_store_up 0") || !strings.Contains(metrics, "rtm_broker_store_pending_writes") {
		t.Errorf("/metrics lacks the store's state:\n%s", grepLines(metrics, "rtm_broker_store"))
	}

	o.start()
	back := time.Now()
	testutil.WaitFor(t, 2*waitCond, func() error {
		want := map[string]bool{"stays": true, "leaves": false, "arrives": true}
		for _, id := range more {
			want[id] = true
		}
		for id, online := range want {
			p, err := o.st.Presence(ctx, id)
			if err != nil {
				return err
			}
			if !p.Seen || p.Online != online {
				return fmt.Errorf("presence of %s: %+v, want online=%t", id, p, online)
			}
		}
		return nil
	})
	t.Logf("presence right %v after the store returned", time.Since(back).Round(time.Millisecond))
	// The push subscription recorded before the outage reached the device
	// that connected during it.
	pub := serviceClient(t, b, "pushapi-test")
	testutil.WaitFor(t, waitCond, func() error {
		pub.Pub(t, "push/alerts", 1, false, "fire")
		select {
		case m := <-arrives.Messages:
			if m.Topic != "push/alerts" {
				return fmt.Errorf("got %s", m.Topic)
			}
			return nil
		case <-time.After(time.Second):
			return fmt.Errorf("no push/alerts message: the recorded push subscription was not applied")
		}
	})
	testutil.WaitFor(t, waitCond, func() error {
		if code, r := readyz(t, b); code != http.StatusOK || r.Store != "up" || r.Pending != 0 {
			return fmt.Errorf("/readyz after the outage: %d %+v", code, r)
		}
		return nil
	})
}

// TestStartupSweep: a broker starting under a name that has devices
// recorded online by an earlier process (killed, so it never recorded
// their disconnects) marks them offline; a record of another node stays.
func TestStartupSweep(t *testing.T) {
	st := storetest.Open(t)
	ctx := testutil.Context(t, waitCond)
	err := st.WritePresence(ctx, []store.PresenceUpdate{
		{ClientID: "ghost", Online: true, Node: "sweeper", Incarnation: "0000000000000001", Conn: "sweeper/1/1", At: time.Now()},
		{ClientID: "old-ghost", Online: true, Node: "sweeper", Conn: "sweeper/1/2", At: time.Now()}, // before incarnations
		{ClientID: "elsewhere", Online: true, Node: "other", Incarnation: "0000000000000001", Conn: "other/1/1", At: time.Now()},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := testcluster.Broker(t, "sweeper", "", func(o *broker.Options) {
		o.Cluster.GossipAddr, o.Store = "", st
	})
	dialV5(t, b, &paho.Connect{ClientID: "fresh", CleanStart: true})
	waitPresence(t, st, "ghost", false)
	waitPresence(t, st, "old-ghost", false)
	p := waitPresence(t, st, "fresh", true)
	if p.Incarnation != b.Incarnation() {
		t.Errorf("fresh recorded with incarnation %q, want %q", p.Incarnation, b.Incarnation())
	}
	if p, _ := st.Presence(ctx, "elsewhere"); !p.Online {
		t.Errorf("another node's device marked offline: %+v", p)
	}
}

func getText(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestStoreOutageOverflow: when more device records pile up during a store
// outage than the broker keeps, the dropped ones are counted, and once the
// store answers the broker reconciles it with its clients: devices that
// left are offline, devices that came are online, and push channels they
// subscribed to are recorded.
func TestStoreOutageOverflow(t *testing.T) {
	o := newOutageStore(t)
	cfg := config.Defaults().Broker
	cfg.NodeName, cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "overflow-node", "127.0.0.1:0", "", "127.0.0.1:0"
	auth := config.Defaults().Auth
	auth.Devices = "anonymous"
	b, err := broker.New(broker.Options{Config: cfg, Auth: auth, Store: o.st, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	broker.SetDeviceQueueLen(b, 4)
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = b.Shutdown(ctx)
	})
	ctx := testutil.Context(t, 4*waitCond)
	var before []*testutil.V5
	for i := range 3 {
		c, _ := dialV5(t, b, &paho.Connect{ClientID: fmt.Sprintf("before-%d", i), CleanStart: true})
		before = append(before, c)
		waitPresence(t, o.st, fmt.Sprintf("before-%d", i), true)
	}

	o.stop()
	for _, c := range before {
		_ = c.Disconnect(&paho.Disconnect{})
	}
	var during []string
	for i := range 12 {
		id := fmt.Sprintf("during-%d", i)
		c, _ := dialV5(t, b, &paho.Connect{ClientID: id, CleanStart: true})
		during = append(during, id)
		if i == 0 {
			subscribe(t, c, 0, paho.SubscribeOptions{Topic: "push/news", QoS: 1})
		}
	}
	testutil.WaitFor(t, waitCond, func() error {
		if s := b.Stats().Store; s == nil || s.Dropped == 0 {
			return fmt.Errorf("store stats %+v, want dropped writes", s)
		}
		return nil
	})

	o.start()
	testutil.WaitFor(t, 2*waitCond, func() error {
		want := map[string]bool{}
		for i := range before {
			want[fmt.Sprintf("before-%d", i)] = false
		}
		for _, id := range during {
			want[id] = true
		}
		for id, online := range want {
			p, err := o.st.Presence(ctx, id)
			if err != nil {
				return err
			}
			if !p.Seen || p.Online != online {
				return fmt.Errorf("presence of %s: %+v, want online=%t", id, p, online)
			}
		}
		subs, err := o.st.DeviceChannels(ctx, "during-0")
		if err != nil || len(subs) != 1 || subs[0].Channel != "news" {
			return fmt.Errorf("channels of during-0: %+v %v, want news", subs, err)
		}
		return nil
	})
	if s := b.Stats().Store; s.Reconciles == 0 || !s.Up {
		t.Errorf("store stats %+v, want up after a reconciliation", s)
	}
}
