package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync"
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

// TestNodeDeathSessionsAdopted: a publisher on n1 streams QoS 1 to
// persistent subscribers on n2, some connected and some offline; n2 is
// killed (kill -9) mid-stream. The survivors adopt n2's sessions from the
// shared store, and what n1 had queued for n2 goes to the adopters; each
// subscriber reconnects to a survivor with session present and, across its
// two connections, gets every message acknowledged to the publisher, with
// duplicates (QoS 1) bounded.
func TestNodeDeathSessionsAdopted(t *testing.T) {
	const subs, msgs = 20, 200
	f := newClusterFixture(t)
	n1, n2, n3 := f.start("n1"), f.start("n2"), f.start("n3")
	waitFormed(t, n1, n2, n3)

	type subscriber struct {
		id   string
		mu   sync.Mutex
		got  []int
		conn *testutil.V5
	}
	collect := func(s *subscriber, c *testutil.V5) {
		go func() {
			for m := range c.Messages {
				n, _ := strconv.Atoi(string(m.Payload))
				s.mu.Lock()
				s.got = append(s.got, n)
				s.mu.Unlock()
			}
		}()
	}
	all := make([]*subscriber, subs)
	for i := range all {
		s := &subscriber{id: fmt.Sprintf("ps-%02d", i)}
		all[i] = s
		c, _ := persistV5(t, n2.mqtt, s.id, 600)
		c.Sub(t, "stream/#", 1)
		if i%2 == 1 {
			_ = c.Disconnect(&paho.Disconnect{}) // offline: messages queue on n2
			continue
		}
		s.conn = c
		collect(s, c)
	}
	waitRoutes(t, n1, "n2", 1)

	pub := testutil.MustV5(t, n1.mqtt, "stream-pub")
	acked := make([]bool, msgs)
	kill := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range msgs {
			if i == msgs/4 {
				close(kill)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "stream/a", QoS: 1, Payload: []byte(strconv.Itoa(i))})
			cancel()
			acked[i] = err == nil
			time.Sleep(10 * time.Millisecond) // a stream, not a burst: it spans the failure
		}
	}()
	<-kill
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)
	waitFailed(t, "n2", n1, n3)

	// Every session of n2 is adopted by a survivor; each device reconnects
	// to its adopter. (Reconnecting elsewhere moves the session from the
	// adopter by the usual takeover, whose own window is documented in
	// docs/clustering.md.)
	owners := sessionOwners(t, f.storeURI)
	testutil.WaitFor(t, 30*time.Second, func() error {
		owners = sessionOwners(t, f.storeURI)
		for _, s := range all {
			if o := owners[s.id]; o != "n1" && o != "n3" {
				return fmt.Errorf("%s owned by %q", s.id, o)
			}
		}
		return nil
	})
	for _, s := range all {
		addr := n1.mqtt
		if owners[s.id] == "n3" {
			addr = n3.mqtt
		}
		c, present := persistV5(t, addr, s.id, 600)
		if !present {
			t.Fatalf("%s: session present = 0 on a survivor after n2 died", s.id)
		}
		collect(s, c)
	}
	<-done
	nAcked := 0
	for _, a := range acked {
		if a {
			nAcked++
		}
	}
	if nAcked < msgs/2 {
		t.Fatalf("only %d of %d publishes acknowledged", nAcked, msgs)
	}
	totalDup, inversions := 0, 0
	testutil.WaitFor(t, 60*time.Second, func() error {
		for _, s := range all {
			s.mu.Lock()
			seen := map[int]bool{}
			for _, n := range s.got {
				seen[n] = true
			}
			s.mu.Unlock()
			var missing []int
			for i, a := range acked {
				if a && !seen[i] {
					missing = append(missing, i)
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("%s has not received acknowledged messages %v (%d received)", s.id, missing, len(seen))
			}
		}
		return nil
	})
	for _, s := range all {
		s.mu.Lock()
		count := map[int]int{}
		prev := -1
		for _, n := range s.got {
			count[n]++
			if count[n] == 1 {
				if n < prev {
					inversions++ // a first delivery before an earlier message's
				}
				prev = n
			}
		}
		s.mu.Unlock()
		for _, c := range count {
			totalDup += c - 1
			if c > 3 {
				t.Fatalf("%s got a message %d times", s.id, c)
			}
		}
	}
	t.Logf("%d of %d publishes acknowledged; %d subscribers got all of them; duplicates %d, first deliveries after a later message %d",
		nAcked, msgs, subs, totalDup, inversions)
	if totalDup > subs*msgs/2 {
		t.Fatalf("%d duplicates: more than half the messages twice", totalDup)
	}
}

// TestNodeDeathFiresWills: the wills of clients connected to a node that
// is killed (MQTT 3.1.1 and 5, QoS 1, one with a will delay) are published
// once, by a survivor, and reach subscribers on every other node.
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

	if _, err := testutil.DialV3(t, n2.mqtt, "will-v3", func(o *mqtt3.ClientOptions) {
		o.SetWill("will/v3", "v3 gone", 1, false)
	}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := testutil.DialV5(t, n2.mqtt, &paho.Connect{ClientID: "will-v5", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "will/v5", QoS: 1, Payload: []byte("v5 gone")}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := testutil.DialV5(t, n2.mqtt, &paho.Connect{ClientID: "will-v5d", CleanStart: true,
		Properties:     &paho.ConnectProperties{SessionExpiryInterval: u32(60)},
		WillMessage:    &paho.WillMessage{Topic: "will/v5d", QoS: 1, Payload: []byte("v5 delayed")},
		WillProperties: &paho.WillProperties{WillDelayInterval: u32(1)}}); err != nil {
		t.Fatal(err)
	}
	// The wills are in the store before the node dies.
	testutil.WaitFor(t, 15*time.Second, func() error {
		st := brokerStats(t, n2.admin)
		if st.Durability == nil || st.Durability.Written < 3 || st.Durability.Queued > 0 {
			return fmt.Errorf("durability %+v", st.Durability)
		}
		return nil
	})
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)

	for _, w := range []*testutil.V5{w1, w3} {
		got := map[string]int{}
		for len(got) < 3 {
			m := w.Next(t, 30*time.Second)
			got[m.Topic]++
		}
		w.None(t, 2*time.Second)
		for _, topic := range []string{"will/v3", "will/v5", "will/v5d"} {
			if got[topic] != 1 {
				t.Fatalf("%s: %s arrived %d times, want once (%v)", w.ClientID(), topic, got[topic], got)
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
