package pushapi

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/x/mongo/driver/topology"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
)

// TestOnline: a device is online only while its record says so and the
// broker that wrote it is alive in gossip, as the same process. A leaving
// broker (shutting down) used to count as alive, and a broker restarted
// under the same name made its previous process's records online again.
func TestOnline(t *testing.T) {
	broker := func(name string, status cluster.Status, inc string) cluster.Member {
		return cluster.Member{Name: name, Status: status, Tags: cluster.Tags{Role: cluster.RoleBroker, Admin: "127.0.0.1:1", Incarnation: inc}}
	}
	rec := store.Presence{Seen: true, Online: true, Node: "b1", Incarnation: "aaaa"}
	for _, tc := range []struct {
		name    string
		rec     store.Presence
		members []cluster.Member
		want    bool
	}{
		{"alive, same process", rec, []cluster.Member{broker("b1", cluster.StatusAlive, "aaaa")}, true},
		{"recorded offline", store.Presence{Seen: true, Node: "b1", Incarnation: "aaaa"}, []cluster.Member{broker("b1", cluster.StatusAlive, "aaaa")}, false},
		{"restarted under the same name", rec, []cluster.Member{broker("b1", cluster.StatusAlive, "bbbb")}, false},
		{"leaving", rec, []cluster.Member{broker("b1", cluster.StatusLeaving, "aaaa")}, false},
		{"left", rec, []cluster.Member{broker("b1", cluster.StatusLeft, "aaaa")}, false},
		{"failed", rec, []cluster.Member{broker("b1", cluster.StatusFailed, "aaaa")}, false},
		{"gone from gossip", rec, []cluster.Member{broker("b2", cluster.StatusAlive, "aaaa")}, false},
		{"record from before incarnations", store.Presence{Seen: true, Online: true, Node: "b1"}, []cluster.Member{broker("b1", cluster.StatusAlive, "bbbb")}, true},
		{"broker from before incarnations", rec, []cluster.Member{broker("b1", cluster.StatusAlive, "")}, true},
		{"a push API of that name", rec, []cluster.Member{{Name: "b1", Status: cluster.StatusAlive, Tags: cluster.Tags{Role: cluster.RolePushAPI}}}, false},
	} {
		if got := online(tc.rec, tc.members); got != tc.want {
			t.Errorf("%s: online = %t, want %t", tc.name, got, tc.want)
		}
	}
}

// TestStoreErrors: a store call that ran out of time answers 503
// store_timeout saying "timed out"; a store that cannot be reached, 503
// store_unavailable. Every store failure used to be store_unavailable,
// including requests that timed out queueing for a connection to a healthy
// store.
func TestStoreErrors(t *testing.T) {
	p := &PushAPI{}
	for _, tc := range []struct {
		name string
		err  error
		code string
	}{
		{"deadline", fmt.Errorf("store: presence: %w", context.DeadlineExceeded), CodeStoreTimeout},
		{"driver refused: no time left", fmt.Errorf("calculated server-side timeout (0 ms) is less than or equal to 0: %w", context.DeadlineExceeded), CodeStoreTimeout},
		{"no slot", errSlotTimeout, CodeStoreTimeout},
		{"no server", topology.ServerSelectionError{Wrapped: context.DeadlineExceeded}, CodeStoreUnavailable},
		{"disconnected", mongo.ErrClientDisconnected, CodeStoreUnavailable},
		{"client gone", context.Canceled, CodeStoreUnavailable},
	} {
		e := p.storeError(tc.err)
		if e.Code != tc.code || e.Status != http.StatusServiceUnavailable {
			t.Errorf("%s: %d %s %q, want 503 %s", tc.name, e.Status, e.Code, e.Message, tc.code)
		}
		if tc.code == CodeStoreTimeout && !strings.HasPrefix(e.Message, "timed out") {
			t.Errorf("%s: message %q, want it to say timed out", tc.name, e.Message)
		}
	}
}
