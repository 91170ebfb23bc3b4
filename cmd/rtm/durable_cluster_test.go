package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// waitFailed waits until every node of nodes sees dead failed (or gone).
func waitFailed(t *testing.T, dead string, nodes ...*clusterNode) {
	t.Helper()
	testutil.WaitFor(t, 30*time.Second, func() error {
		for _, n := range nodes {
			s, err := clusterStats(n.admin)
			if err != nil {
				return err
			}
			if st := memberStatus(s, dead); st != "failed" && st != "" {
				return fmt.Errorf("%s sees %s %q", n.name, dead, st)
			}
		}
		return nil
	})
}

// TestNodeDeathFiresWills: the wills of clients connected to a node that
// is killed right after their CONNACKs (MQTT 3.1.1 and 5, QoS 1, with and
// without a persistent session, a new and a resumed one, one with a will
// delay) are published once, by a survivor, and reach subscribers on
// every other node. Every will is stored before its CONNACK (before, the
// records of clients without a persistent session were written 50-100 ms
// after it, and so were the wills of persistent sessions: the kill lost
// them).
func TestNodeDeathFiresWills(t *testing.T) {
	f := newClusterFixture(t)
	n1, n2, n3 := f.start("n1"), f.start("n2"), f.start("n3")
	waitFormed(t, n1, n2, n3)
	w1 := testutil.MustV5(t, n1.mqtt, "watch-1")
	w1.Sub(t, "will/#", 1)
	w3 := testutil.MustV5(t, n3.mqtt, "watch-3")
	w3.Sub(t, "will/#", 1)
	waitRoutes(t, n2, "n1", 1)
	waitRoutes(t, n2, "n3", 1)

	// A persistent session stored without a will, resumed with one below.
	r, _ := persistV5(t, n2.mqtt, "will-v5r", 60)
	r.Sub(t, "cmd/will-v5r", 1)
	_ = r.Disconnect(&paho.Disconnect{})
	testutil.WaitFor(t, 15*time.Second, func() error {
		st := brokerStats(t, n2.admin)
		if st.Durability == nil || st.Durability.Written < 1 || st.Durability.Queued > 0 || st.Connections != 0 {
			return fmt.Errorf("durability %+v, %d connections", st.Durability, st.Connections)
		}
		return nil
	})

	wills := map[string]bool{}
	v5 := func(id string, expiry uint32, delay uint32) {
		t.Helper()
		cp := &paho.Connect{ClientID: id, CleanStart: expiry == 0,
			WillMessage: &paho.WillMessage{Topic: "will/" + id, QoS: 1, Payload: []byte(id + " gone")}}
		if expiry > 0 {
			cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: u32(expiry)}
		}
		if delay > 0 {
			cp.WillProperties = &paho.WillProperties{WillDelayInterval: u32(delay)}
		}
		if _, _, err := testutil.DialV5(t, n2.mqtt, cp); err != nil {
			t.Fatal(err)
		}
		wills["will/"+id] = true
	}
	v3 := func(id string, clean bool) {
		t.Helper()
		if _, err := testutil.DialV3(t, n2.mqtt, id, func(o *mqtt3.ClientOptions) {
			o.SetCleanSession(clean)
			o.SetWill("will/"+id, id+" gone", 1, false)
		}); err != nil {
			t.Fatal(err)
		}
		wills["will/"+id] = true
	}
	// The clients without a persistent session first: a CONNACK that
	// waits for its will's commit also waits for every write queued
	// before it.
	v3("will-v3", true)
	v5("will-v5", 0, 0)
	v5("will-v5d", 60, 1) // persistent, new, will delay
	v3("will-v3p", false) // persistent
	v5("will-v5r", 60, 0) // persistent, resumed
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)

	for _, w := range []*testutil.V5{w1, w3} {
		got := map[string]int{}
		wait := time.Now().Add(30 * time.Second)
		for len(got) < len(wills) && time.Now().Before(wait) {
			select {
			case m := <-w.Messages:
				got[m.Topic]++
			case <-time.After(time.Until(wait)):
			}
		}
		w.None(t, 2*time.Second)
		for topic := range wills {
			if got[topic] != 1 {
				t.Errorf("%s: %s arrived %d times, want once (got %v)", w.ClientID(), topic, got[topic], got)
			}
		}
	}
}

// sessionOwners reads which node owns each stored session.
func sessionOwners(t *testing.T, uri string) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := mongo.Connect(options.Client().ApplyURI(uri))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cl.Disconnect(context.Background()) }()
	cur, err := cl.Database("rtm").Collection("sessions").Find(ctx, bson.D{})
	if err != nil {
		t.Fatal(err)
	}
	var docs []struct {
		ID    string `bson:"_id"`
		Owner string `bson:"owner"`
	}
	if err := cur.All(ctx, &docs); err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, d := range docs {
		m[d.ID] = d.Owner
	}
	return m
}

// TestMovedSessionSurvivesItsNewNode: an offline persistent session with
// queued messages moves from n1 to n2 (n1 is evacuated), more messages
// queue for it on n2, and n2 is killed. The survivor adopts it with every
// message: the device reconnects to n1 with session present and gets all
// 20. Before, the stored document still named n1 (alive) as owner, so
// nobody adopted it (session present 0, nothing delivered); and the move
// deleted the stored copies of the messages it carried (mochi patch 77).
func TestMovedSessionSurvivesItsNewNode(t *testing.T) {
	const half = 10
	f := newClusterFixture(t)
	n1, n2 := f.start("n1"), f.start("n2")
	waitFormed(t, n1, n2)

	c, _ := persistV5(t, n1.mqtt, "mv-dev", 600)
	c.Sub(t, "mv/t", 1)
	waitRoutes(t, n2, "n1", 1)
	_ = c.Disconnect(&paho.Disconnect{})
	pub := testutil.MustV5(t, n2.mqtt, "mv-pub")
	for i := range half {
		pub.Pub(t, "mv/t", 1, false, strconv.Itoa(i))
	}
	adminPost(t, n1.admin, "/v1/drain?evacuate=true")
	testutil.WaitFor(t, 30*time.Second, func() error {
		if o := sessionOwners(t, f.storeURI)["mv-dev"]; o != "n2" {
			return fmt.Errorf("stored session owned by %q, want n2 (it moved there)", o)
		}
		return nil
	})
	adminPost(t, n1.admin, "/v1/undrain")
	for i := half; i < 2*half; i++ {
		pub.Pub(t, "mv/t", 1, false, strconv.Itoa(i))
	}
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)
	waitFailed(t, "n2", n1)
	testutil.WaitFor(t, 30*time.Second, func() error {
		if o := sessionOwners(t, f.storeURI)["mv-dev"]; o != "n1" {
			return fmt.Errorf("stored session owned by %q, want n1 (adopted)", o)
		}
		return nil
	})
	c, present := persistV5(t, n1.mqtt, "mv-dev", 600)
	if !present {
		t.Fatal("reconnected to the survivor without its session")
	}
	seen := map[string]bool{}
	for len(seen) < 2*half {
		m := c.Next(t, 20*time.Second)
		seen[string(m.Payload)] = true
	}
}

// adminPost posts to a broker's admin endpoint with the test admin key and
// fails the test unless it answers 200.
func adminPost(t *testing.T, admin, path string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+testAdminKey)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %d", path, res.StatusCode)
	}
}
