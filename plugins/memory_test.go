package plugins_test

import (
	"fmt"
	"runtime"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// TestAuthHookMemoryPerConnection bounds what the auth hook keeps for each
// connected device authenticated by a token (identity, expiry timer, the
// client ID table): the heap it holds once 2,000 devices have connected,
// divided by 2,000. Idle connections are most of a broker's memory; rtm's
// target is 8 KiB of RSS per idle connection in all. Three sync.Map
// entries per connection held about 0.6 KiB; the state on the client
// (mochi patch 106) about 0.2 KiB.
func TestAuthHookMemoryPerConnection(t *testing.T) {
	const n = 2000
	h := hook(t, tokenAuth(""), nil)
	s := newSigner(t, keyA)
	cls := make([]*mqtt.Client, n)
	pks := make([]packets.Packet, n)
	for i := range cls {
		id := fmt.Sprintf("device-%05d", i)
		cls[i] = &mqtt.Client{ID: id}
		cls[i].Properties.ProtocolVersion = 5
		pks[i] = packets.Packet{Connect: packets.ConnectParams{
			ClientIdentifier: id, Username: []byte(id), UsernameFlag: true,
			Password: []byte(deviceToken(t, s, id)), PasswordFlag: true,
		}}
	}
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	for i, cl := range cls {
		if err := h.OnConnect(cl, pks[i]); err != nil || !h.OnConnectAuthenticate(cl, pks[i]) {
			t.Fatalf("device %d refused: %v", i, err)
		}
		h.OnSessionEstablished(cl, pks[i])
	}
	per := float64(int64(heap())-int64(before)) / n
	t.Logf("auth hook state: %.0f bytes per connection", per)
	if per > 320 {
		t.Errorf("auth hook keeps %.0f bytes per connection, want at most 320", per)
	}
	// Every device is still known (the state was not collected), and
	// disconnecting gives it back.
	for _, cl := range cls {
		if !h.OnACLCheck(cl, "devices/"+cl.ID+"/inbox", false) {
			t.Fatalf("%s may not read its inbox", cl.ID)
		}
		h.OnDisconnect(cl, nil, false)
	}
	if after := float64(int64(heap())-int64(before)) / n; after > 64 {
		t.Errorf("%.0f bytes per connection still held after every disconnect", after)
	}
	runtime.KeepAlive(cls)
	runtime.KeepAlive(pks)
}
