package broker

import (
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// EstablishingEntries: the sizes of the durable hook's maps of
// connections establishing (establishing, preWritten, skipped).
func (b *Broker) EstablishingEntries() (int, int, int) {
	b.durable.mu.Lock()
	defer b.durable.mu.Unlock()
	return len(b.durable.establishing), len(b.durable.preWritten), len(b.durable.skipped)
}

// SweepEstablishingAlways makes every CONNECT sweep the durable hook's
// maps of connections whose CONNECT failed (not once per second).
func (b *Broker) SweepEstablishingAlways() {
	b.durable.mu.Lock()
	b.durable.establishSweepEvery = 0
	b.durable.mu.Unlock()
}

// ServeTCPConn serves c as a connection on the TCP listener.
func (b *Broker) ServeTCPConn(c net.Conn) error { return b.mq.EstablishConnection("tcp", c) }

// BeginRefusedConnect runs the durable hooks of a CONNECT of client id
// (v5, clean start false, session expiry 600, a will) up to where the
// cluster hook would wait for peers; the returned func is the cluster
// hook refusing it (as its stale-CONNECT or move-failed paths do), then
// the will hook.
func (b *Broker) BeginRefusedConnect(id string) func() {
	cl := b.mq.NewClient(nil, "tcp", id, false)
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.SessionExpiryInterval, cl.Properties.Props.SessionExpiryIntervalFlag = 600, true
	cl.Properties.Will = mqtt.Will{Flag: 1, TopicName: "rev/new", Payload: []byte("x"), Qos: 1}
	pk := packets.Packet{Connect: packets.ConnectParams{Clean: false, ClientIdentifier: id}}
	b.durable.OnSessionEstablish(cl, pk)
	return func() {
		cl.RefuseSession(packets.ErrServerUnavailable)
		(&durableWillHook{d: b.durable}).OnSessionEstablish(cl, pk)
	}
}

// NoEstablishSweep turns the durable hook's sweep of failed CONNECTs off
// (for an hour), so a test sees what the hooks alone do.
func (b *Broker) NoEstablishSweep() {
	b.durable.mu.Lock()
	b.durable.establishSweepEvery = time.Hour
	b.durable.establishSwept = time.Now()
	b.durable.mu.Unlock()
}

// SetTestOnDisconnect calls f first in the durable hook's OnDisconnect;
// nil removes it.
func (b *Broker) SetTestOnDisconnect(f func(cl *mqtt.Client)) {
	if f == nil {
		b.durable.testOnDisconnect.Store(nil)
		return
	}
	b.durable.testOnDisconnect.Store(&f)
}
