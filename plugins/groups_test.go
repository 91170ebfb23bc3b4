package plugins_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/plugins"
)

// members is a fixed Membership: device → its groups.
type members map[string][]string

func (m members) Member(clientID, group string) bool { return slices.Contains(m[clientID], group) }

// TestACLGroups: with a membership source, groups/{id} and the topics under
// it are open to the group's members both ways, and to nobody else;
// wildcards for the group level are granted and each delivery checked.
func TestACLGroups(t *testing.T) {
	auth := tokenAuth("")
	hs, err := plugins.Hooks(plugins.Options{Auth: auth, Logger: testLogger(t), Groups: members{alice: {"g1"}}})
	if err != nil {
		t.Fatal(err)
	}
	h := hs[0]
	cls := clients(t, h, auth)
	runACL(t, h, cls, []aclCase{
		{alice, sub, "groups/g1", true},
		{alice, pub, "groups/g1", true},
		{alice, deliver, "groups/g1", true},
		{alice, sub, "groups/g1/chat", true},
		{alice, pub, "groups/g1/chat/x", true},
		{alice, sub, "groups/g1/#", true},
		{alice, sub, "groups/g2", false},
		{alice, pub, "groups/g2", false},
		{alice, deliver, "groups/g2", false},
		{alice, sub, "groups/g2/#", false},
		{alice, sub, "groups/+", true}, // deliveries are checked per topic
		{alice, sub, "groups/#", true},
		{alice, sub, "groups/+/chat", true},
		{alice, pub, "groups", false},
		{alice, pub, "groups/", false},
		{alice, sub, "$share/s/groups/g1", true},
		{alice, sub, "$share/s/groups/g2", false},
		{offline, deliver, "groups/g1", true}, // a session without identity is its client ID
		{offline, deliver, "groups/g2", false},
		{svc, pub, "groups/g2", true},
	})
}

// loader is a GroupsLoader over a mutable membership, counting reads; a
// read may be held at gate.
type loader struct {
	mu    sync.Mutex
	m     map[string][]string
	reads atomic.Int64
	fail  atomic.Bool
	gate  chan chan struct{} // when set, each read sends a channel and waits for it to close
}

func (l *loader) load(ctx context.Context, devices []string) (map[string][]string, error) {
	l.reads.Add(1)
	if l.fail.Load() {
		return nil, errors.New("store down")
	}
	l.mu.Lock()
	out := map[string][]string{}
	for _, d := range devices {
		out[d] = slices.Clone(l.m[d])
	}
	gate := l.gate
	l.mu.Unlock()
	if gate != nil { // the answer is read before the wait: a read that started before a change
		ch := make(chan struct{})
		gate <- ch
		<-ch
	}
	return out, nil
}

func (l *loader) set(device string, groups ...string) {
	l.mu.Lock()
	l.m[device] = groups
	l.mu.Unlock()
}

func TestGroupCache(t *testing.T) {
	l := &loader{m: map[string][]string{"a": {"g1"}, "b": {"g1", "g2"}}}
	c := plugins.NewGroupCache(l.load, testLogger(t))
	if !c.Member("a", "g1") || c.Member("a", "g2") || l.reads.Load() != 1 {
		t.Fatalf("a: g1 and not g2 in one read; %d reads", l.reads.Load())
	}
	if !c.Member("a", "g1") || l.reads.Load() != 1 {
		t.Fatal("a read again")
	}
	// Notices change cached devices without a read.
	l.set("a", "g2")
	c.Apply(plugins.GroupChange{Group: "g1", Removed: []string{"a"}})
	c.Apply(plugins.GroupChange{Group: "g2", Added: []string{"a", "nobody"}})
	if c.Member("a", "g1") || !c.Member("a", "g2") || l.reads.Load() != 1 {
		t.Fatalf("after notices: g1 %t g2 %t, %d reads", c.Member("a", "g1"), c.Member("a", "g2"), l.reads.Load())
	}
	// A deleted group leaves every cached device.
	c.Member("b", "g2")
	c.Apply(plugins.GroupChange{Group: "g2", Deleted: true})
	if c.Member("a", "g2") || c.Member("b", "g2") || !c.Member("b", "g1") {
		t.Fatal("g2 deleted: still a member")
	}
	// A failed read denies; the next second's questions are denied without
	// a read (a store outage must not cost every delivery a read timeout);
	// after it the device is read again.
	l.fail.Store(true)
	if c.Member("x", "g1") {
		t.Fatal("store down: granted")
	}
	l.fail.Store(false)
	l.set("x", "g1")
	reads := l.reads.Load()
	failedAt := time.Now()
	if c.Member("x", "g1") {
		if time.Since(failedAt) < time.Second {
			t.Fatal("read again at once after a failure")
		}
	} else if l.reads.Load() != reads {
		t.Fatal("denied, but read again within a second of a failure")
	}
	testutil.WaitFor(t, 5*time.Second, func() error {
		if !c.Member("x", "g1") {
			return errors.New("store back: x not read again")
		}
		return nil
	})
	if s := c.Stats(); s.LoadErrors != 1 || s.Denied < 2 {
		t.Fatalf("stats %+v, want 1 load error, 2 or more denied", s)
	}
	// Refresh repairs a missed notice and forgets devices no longer here.
	l.set("b", "g3")
	if err := c.Refresh(context.Background(), func(id string) bool { return id != "x" }); err != nil {
		t.Fatal(err)
	}
	if c.Member("b", "g1") || !c.Member("b", "g3") {
		t.Fatal("refresh did not repair b")
	}
	if s := c.Stats(); s.Devices != 2 {
		t.Fatalf("after refresh: %+v, want a and b cached", s)
	}
}

// TestGroupCacheReadRacingNotice: a read that started before a change and
// returns after its notice must not overwrite the notice: the cache reads
// again.
func TestGroupCacheReadRacingNotice(t *testing.T) {
	l := &loader{m: map[string][]string{"a": {"g1"}}, gate: make(chan chan struct{})}
	c := plugins.NewGroupCache(l.load, testLogger(t))
	got := make(chan bool)
	go func() { got <- c.Member("a", "g1") }()
	first := <-l.gate // the read has its (old) answer: member of g1
	l.mu.Lock()
	l.m["a"] = nil // removed in the store, then the notice
	l.mu.Unlock()
	c.Apply(plugins.GroupChange{Group: "g1", Removed: []string{"a"}})
	close(first)
	select {
	case second := <-l.gate:
		close(second)
	case <-time.After(5 * time.Second):
		t.Fatal("no second read after a notice raced the first")
	}
	if <-got {
		t.Fatal("a read from before the removal was kept: a is still a member")
	}
	l.mu.Lock()
	l.gate = nil
	l.mu.Unlock()
	if c.Member("a", "g1") {
		t.Fatal("a is a member")
	}
}

// BenchmarkACLGroupDelivery is the check mochi makes for every delivery on
// a group topic, with the device's memberships cached, beside the same
// check for a push channel: it must not allocate.
func BenchmarkACLGroupDelivery(b *testing.B) {
	l := &loader{m: map[string][]string{alice: {"g0", "g1", "g2"}}}
	c := plugins.NewGroupCache(l.load, nil)
	hs, err := plugins.Hooks(plugins.Options{Auth: tokenAuth(""), Groups: c})
	if err != nil {
		b.Fatal(err)
	}
	h := hs[0]
	cl := &mqtt.Client{ID: alice}
	for _, topic := range []string{"push/news", "groups/g1"} {
		b.Run(topic, func(b *testing.B) {
			if !h.OnACLCheck(cl, topic, false) {
				b.Fatal("denied")
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if !h.OnACLCheck(cl, topic, false) {
					b.Fatal("denied")
				}
			}
		})
	}
}
