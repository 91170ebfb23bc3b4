package broker

import (
	"context"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// drainer takes a broker out of service without a restart: draining, the
// node tells the cluster (gossip tag) so routers and other brokers stop
// sending it devices; evacuating, it also disconnects its clients a few at
// a time, pointing MQTT 5 clients at another broker, so they reconnect
// elsewhere without a thundering herd, and then hands the sessions left
// (of offline clients) to live peers.
type drainer struct {
	b *Broker

	mu         sync.Mutex
	draining   bool
	evacuating bool
	stop       context.CancelFunc // ends the evacuation in progress
	done       chan struct{}      // closed when it has ended
	evacuated  int64
}

// DrainState is what /v1/drain answers.
type DrainState struct {
	Node        string `json:"node"`
	Draining    bool   `json:"draining"`
	Evacuating  bool   `json:"evacuating"`
	Evacuated   int64  `json:"evacuated"`
	Connections int64  `json:"connections"`
}

func (d *drainer) state() DrainState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return DrainState{Node: d.b.cfg.NodeName, Draining: d.draining, Evacuating: d.evacuating, Evacuated: d.evacuated,
		Connections: d.b.Stats().Connections}
}

// Drain sets the node draining; with evacuate it also starts disconnecting
// its clients at broker.evacuate_rate per second, until none is left or
// Undrain is called.
func (b *Broker) Drain(evacuate bool) DrainState {
	d := b.drain
	d.mu.Lock()
	if !d.draining {
		d.draining = true
		b.log.Info("draining: no new devices will be sent here", "evacuate", evacuate)
	}
	if evacuate && !d.evacuating {
		ctx, cancel := context.WithCancel(context.Background())
		d.evacuating, d.stop, d.done = true, cancel, make(chan struct{})
		go d.evacuate(ctx, d.done)
	}
	d.mu.Unlock()
	if b.cluster != nil {
		b.cluster.retag()
	}
	return d.state()
}

// Undrain reverses Drain: the node takes devices again and stops
// evacuating.
func (b *Broker) Undrain() DrainState {
	d := b.drain
	d.stopEvacuation()
	d.mu.Lock()
	wasDraining := d.draining
	d.draining = false
	d.mu.Unlock()
	if wasDraining {
		b.log.Info("undrained: taking devices again")
	}
	if b.cluster != nil {
		b.cluster.retag()
	}
	return d.state()
}

// Draining reports whether the node is draining.
func (b *Broker) Draining() bool {
	b.drain.mu.Lock()
	defer b.drain.mu.Unlock()
	return b.drain.draining
}

func (d *drainer) evacuate(ctx context.Context, done chan struct{}) {
	defer close(done)
	defer func() {
		d.mu.Lock()
		d.evacuating = false
		d.mu.Unlock()
	}()
	rate := d.b.cfg.EvacuateRate
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	d.b.log.Info("evacuating clients", "rate_per_second", rate)
	for {
		// One pass over a snapshot of the connected clients, then another
		// for those that connected meanwhile (a router may still have sent
		// a few before it saw the drain).
		var clients []*mqtt.Client
		for _, cl := range d.b.mq.Clients.GetAll() {
			if !cl.Closed() && cl.Net.Conn != nil {
				clients = append(clients, cl)
			}
		}
		if len(clients) == 0 {
			d.b.log.Info("evacuation done: no client left", "evacuated", d.evacuated)
			// Sessions of clients that are offline (or that went and
			// have not come back elsewhere yet) move to live peers too,
			// so the node can be taken down without losing them.
			if d.b.cluster != nil {
				if kept := d.b.cluster.handOver(ctx, true); len(kept) > 0 {
					d.b.log.Warn("evacuation: sessions not handed over stay here", "sessions", len(kept))
				}
			}
			return
		}
		for _, cl := range clients {
			select {
			case <-ctx.Done():
				d.b.log.Info("evacuation stopped", "evacuated", d.evacuated)
				return
			case <-tick.C:
			}
			if cl.Closed() {
				continue
			}
			d.b.redirect(cl, packets.ErrUseAnotherServer, d.b.reference(cl.Net.Listener))
			d.mu.Lock()
			d.evacuated++
			d.mu.Unlock()
		}
	}
}

// reference returns the address of the broker a client of listener should
// use instead of this one, chosen as the router would ("" if none).
func (b *Broker) reference(listener string) string {
	if b.cluster == nil || b.cluster.node == nil {
		return ""
	}
	transport := listener
	if transport == "" {
		transport = cluster.TransportTCP
	}
	m, ok := cluster.Pick(b.cluster.node.Members(), transport, cluster.PickOptions{Exclude: b.cfg.NodeName})
	if !ok {
		return ""
	}
	return m.Tags.Endpoint(transport)
}

// redirect disconnects cl with code (0x9C use another server, or 0x8B
// server shutting down), naming broker ref (if not "") in a Server
// Reference for an MQTT 5 client. An MQTT 3.1.1 client is just disconnected: it has no
// DISCONNECT from the server, and asks the router again.
func (b *Broker) redirect(cl *mqtt.Client, code packets.Code, ref string) {
	if cl.Properties.ProtocolVersion == 5 {
		props := packets.Properties{ReasonString: code.Reason, ServerReference: ref}
		if cl.Net.Conn != nil {
			_ = cl.Net.Conn.SetWriteDeadline(time.Now().Add(shutdownWriteGrace))
		}
		_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ReasonCode: code.Code, Properties: props})
	}
	cl.Stop(code)
}

// stopEvacuation ends an evacuation in progress and waits for it.
func (d *drainer) stopEvacuation() {
	d.mu.Lock()
	stop, done := d.stop, d.done
	d.stop = nil
	d.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
}
