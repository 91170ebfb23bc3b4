// SPDX-License-Identifier: MIT
// rtm patches 106 and 107: per-connection hook values, no empty maps.

package mqtt

import (
	"net"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
)

// One slot for the tests; the package's other tests take none, so one of
// clientSlots stays free.
var testSlot = NewClientSlot[string]()

// rtm patch 106: a hook's value lives on its connection's Client.
func TestClientSlotHoldsAValuePerClient(t *testing.T) {
	a, _, _ := newTestClient()
	b, _, _ := newTestClient()
	require.Nil(t, testSlot.Load(a), "a new client's slot is empty")
	va, vb := "a", "b"
	testSlot.Store(a, &va)
	testSlot.Store(b, &vb)
	require.Equal(t, "a", *testSlot.Load(a))
	require.Equal(t, "b", *testSlot.Load(b))
	require.False(t, testSlot.CompareAndSwap(a, &vb, nil), "the value is not vb")
	require.True(t, testSlot.CompareAndSwap(a, &va, nil))
	require.Nil(t, testSlot.Load(a))
	require.Equal(t, &vb, testSlot.Swap(b, nil))
	require.Nil(t, testSlot.Load(b))

	// Loads beside stores of other goroutines (run with -race).
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		v := string(rune('a' + i))
		go func() {
			defer wg.Done()
			for j := 0; j < 1000; j++ {
				testSlot.Store(a, &v)
				_ = testSlot.Load(a)
			}
		}()
	}
	wg.Wait()
	require.NotNil(t, testSlot.Load(a))
}

// rtm patch 106: slots are few; taking one more than there are is a
// programming error, found at start-up.
func TestClientSlotsAreBounded(t *testing.T) {
	taken := clientSlotsTaken.Load()
	defer clientSlotsTaken.Store(taken)
	for clientSlotsTaken.Load() < clientSlots {
		NewClientSlot[int]()
	}
	require.Panics(t, func() { NewClientSlot[int]() })
}

func connectForLazyMaps() packets.Packet {
	return packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        60,
			ClientIdentifier: "lazy",
		},
		Properties: packets.Properties{TopicAliasMaximum: 7, ReceiveMaximum: 10},
	}
}

func opsForLazyMaps() *ops {
	return &ops{info: new(system.Info), hooks: new(Hooks), log: logger, options: &Options{Capabilities: NewDefaultServerCapabilities()}}
}

// rtm patch 107: an idle connection holds no empty in-flight or topic
// alias maps, and its outbound aliases are made once; the maps appear with
// their first entry.
func TestIdleClientHasNoEmptyMaps(t *testing.T) {
	r, w := net.Pipe()
	defer r.Close()
	defer w.Close()
	o := opsForLazyMaps()
	cl := newClient(w, o)
	out := cl.State.TopicAliases.Outbound
	cl.ParseConnect("tcp", connectForLazyMaps())

	require.Same(t, out, cl.State.TopicAliases.Outbound, "the outbound aliases newClient made are kept, not made again")
	require.Nil(t, cl.State.Inflight.internal, "no in-flight map before a QoS 1/2 message")
	require.Nil(t, cl.State.TopicAliases.Inbound.internal, "no inbound alias map before an alias")
	require.Nil(t, cl.State.TopicAliases.Outbound.internal, "no outbound alias map before an alias")

	// The maps work once used, with the client's maximum for outbound
	// aliases (7, from its CONNECT).
	for i := 1; i <= 7; i++ {
		id, ok := cl.State.TopicAliases.Outbound.Set("t/" + string(rune('0'+i)))
		require.False(t, ok)
		require.Equal(t, uint16(i), id)
	}
	id, _ := cl.State.TopicAliases.Outbound.Set("t/8")
	require.Equal(t, uint16(0), id, "past the client's Topic Alias Maximum")
	require.Equal(t, "x", cl.State.TopicAliases.Inbound.Set(1, "x"))
	require.Equal(t, "x", cl.State.TopicAliases.Inbound.Set(1, ""))
	require.True(t, cl.State.Inflight.Set(packets.Packet{PacketID: 3, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}))
	_, ok := cl.State.Inflight.Get(3)
	require.True(t, ok)
	require.Equal(t, 1, cl.State.Inflight.Clone().Len())
	require.Equal(t, 0, NewInflights().Clone().Len())
}

// rtm patch 107: what making a client and reading its CONNECT allocates:
// 5 allocations fewer (the in-flight map, both alias maps, and the second
// outbound alias struct with its map).
func TestClientSetupAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	r, w := net.Pipe()
	defer r.Close()
	defer w.Close()
	o := opsForLazyMaps()
	pk := connectForLazyMaps()
	allocs := testing.AllocsPerRun(200, func() {
		cl := newClient(w, o)
		cl.ParseConnect("tcp", pk)
	})
	t.Logf("%.0f allocations per client set up", allocs)
	require.LessOrEqual(t, allocs, float64(clientSetupAllocs))
}

// clientSetupAllocs: measured 10 (15 without patch 107).
const clientSetupAllocs = 10

// rtm patch 108: the client keeps its username, not the CONNECT's body
// (which holds the password, a token of a few hundred bytes with rtm).
func TestClientKeepsNoConnectBody(t *testing.T) {
	r, w := net.Pipe()
	defer r.Close()
	defer w.Close()
	body := make([]byte, 400)
	copy(body, "device-1")
	pk := connectForLazyMaps()
	pk.Connect.Username = body[:8:8]
	pk.Connect.UsernameFlag = true
	pk.Connect.Password = body[8:]
	pk.Connect.PasswordFlag = true
	cl := newClient(w, opsForLazyMaps())
	cl.ParseConnect("tcp", pk)
	require.Equal(t, []byte("device-1"), cl.Properties.Username)
	copy(body, "XXXXXXXX") // the read buffer reused, say
	require.Equal(t, []byte("device-1"), cl.Properties.Username, "the username is a copy, not a slice of the CONNECT's body")
	require.LessOrEqual(t, cap(cl.Properties.Username), 16, "the copy holds the username only")
}
