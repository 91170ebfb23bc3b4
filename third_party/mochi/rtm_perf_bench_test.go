// SPDX-License-Identifier: MIT
// rtm patches 69-72: publish-path benchmarks (allocations and write(2) calls
// per message), see PATCHES.md.

package mqtt

import (
	"net"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// countConn is a net.Conn that accepts every write and counts the Write
// calls (each one a write(2) on a TCP connection) and bytes.
type countConn struct {
	closed chan struct{}
	writes atomic.Int64
	bytes  atomic.Int64
}

func newCountConn() *countConn { return &countConn{closed: make(chan struct{})} }

func (c *countConn) Read([]byte) (int, error) { <-c.closed; return 0, net.ErrClosed }
func (c *countConn) Write(b []byte) (int, error) {
	c.writes.Add(1)
	c.bytes.Add(int64(len(b)))
	return len(b), nil
}
func (c *countConn) Close() error                     { return nil }
func (c *countConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *countConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *countConn) SetDeadline(time.Time) error      { return nil }
func (c *countConn) SetReadDeadline(time.Time) error  { return nil }
func (c *countConn) SetWriteDeadline(time.Time) error { return nil }

// publishPath is a server with one publisher and n subscribers on "a/b",
// all on counting connections, for driving processPacket with the
// publisher's PUBLISH as the read loop does.
type publishPath struct {
	s     *Server
	pub   *Client
	subs  []*Client
	conns []*countConn // pub's first
	ids   []uint16     // the next packet id each subscriber is sent (QoS 1)
	qos   byte
	pk    packets.Packet
}

func newPublishPath(n int, qos, version byte) *publishPath {
	s := newServer()
	p := &publishPath{s: s, qos: qos, ids: make([]uint16, n)}
	mk := func(id string) *Client {
		c := newCountConn()
		p.conns = append(p.conns, c)
		cl := s.NewClient(c, "bench", id, false)
		cl.ID = id
		cl.Properties.ProtocolVersion = version
		cl.State.Inflight.ResetReceiveQuota(1024)
		s.Clients.Add(cl)
		return cl
	}
	p.pub = mk("pub")
	for i := 0; i < n; i++ {
		cl := mk("sub" + strconv.Itoa(i))
		s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/b", Qos: qos})
		p.subs = append(p.subs, cl)
		p.ids[i] = 1
	}
	p.pk = packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos},
		ProtocolVersion: version,
		TopicName:       "a/b",
		Payload:         make([]byte, 64),
	}
	return p
}

// publish runs one PUBLISH from the publisher through processPacket, then
// acknowledges it for every QoS 1 subscriber, as their PUBACKs would.
func (p *publishPath) publish(i int) error {
	pk := p.pk
	if p.qos > 0 {
		pk.PacketID = uint16(i%65535 + 1)
	}
	if err := p.s.processPacket(p.pub, pk); err != nil {
		return err
	}
	if p.qos > 0 {
		for j, cl := range p.subs {
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: p.ids[j]}
			if err := p.s.processPuback(cl, ack); err != nil {
				return err
			}
			p.ids[j]++
			if p.ids[j] == 0 {
				p.ids[j] = 1
			}
		}
	}
	return nil
}

// drain waits until every subscriber's queue is written out.
func (p *publishPath) drain() {
	for _, cl := range p.subs {
		waitOutboundDrained(cl)
	}
}

func (p *publishPath) writes() (n int64) {
	for _, c := range p.conns {
		n += c.writes.Load()
	}
	return n
}

func benchPublishPath(b *testing.B, subs int, qos, version byte) {
	p := newPublishPath(subs, qos, version)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := p.publish(i); err != nil {
			b.Fatal(err)
		}
		if i%256 == 0 { // keep the queues short: the uncongested path
			for _, cl := range p.subs {
				for cl.State.outbound.len() > 64 {
					runtime.Gosched()
				}
			}
		}
	}
	p.drain()
	b.StopTimer()
	b.ReportMetric(float64(p.writes())/float64(b.N), "writes/msg")
}

func BenchmarkPublishPathQoS0FanIn(b *testing.B)    { benchPublishPath(b, 1, 0, 4) }
func BenchmarkPublishPathQoS1FanIn(b *testing.B)    { benchPublishPath(b, 1, 1, 4) }
func BenchmarkPublishPathQoS0FanOut10(b *testing.B) { benchPublishPath(b, 10, 0, 4) }
func BenchmarkPublishPathQoS1FanOut10(b *testing.B) { benchPublishPath(b, 10, 1, 4) }
func BenchmarkPublishPathV5QoS1FanIn(b *testing.B)  { benchPublishPath(b, 1, 1, 5) }
func BenchmarkPublishPathV5QoS0FanOut10(b *testing.B) {
	benchPublishPath(b, 10, 0, 5)
}

// BenchmarkPublishPathQoS0Idle publishes each message to a subscriber
// whose queue is empty and waits until it is written: every message starts
// a writer goroutine (patch 83: its stack no longer grows for the ~800-byte
// packet copies of WritePacket).
func BenchmarkPublishPathQoS0Idle(b *testing.B) {
	p := newPublishPath(1, 0, 4)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := p.publish(i); err != nil {
			b.Fatal(err)
		}
		q := &p.subs[0].State.outbound
		for { // the writer has exited: the next message starts another
			q.mu.Lock()
			idle := q.n.Load() == 0 && !q.writing
			q.mu.Unlock()
			if idle {
				break
			}
			runtime.Gosched()
		}
	}
}
