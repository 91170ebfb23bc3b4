// SPDX-License-Identifier: MIT
// rtm patch: outbound queue benchmark, see PATCHES.md.

package mqtt

import (
	"errors"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// discardConn is a net.Conn that accepts and drops every write.
type discardConn struct{ closed chan struct{} }

func newDiscardConn() *discardConn { return &discardConn{closed: make(chan struct{})} }

func (c *discardConn) Read([]byte) (int, error)         { <-c.closed; return 0, net.ErrClosed }
func (c *discardConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *discardConn) Close() error                     { return nil }
func (c *discardConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *discardConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *discardConn) SetDeadline(time.Time) error      { return nil }
func (c *discardConn) SetReadDeadline(time.Time) error  { return nil }
func (c *discardConn) SetWriteDeadline(time.Time) error { return nil }

// benchPublishToClient measures publishing QoS 0 packets to one client through
// its outbound queue and WriteLoop, end to end: every packet is queued (the
// producer retries when the queue is full) and written before the clock stops.
func benchPublishToClient(b *testing.B, producers int) {
	s := newServer()
	cl := s.NewClient(newDiscardConn(), "bench", "sub", false)
	cl.Properties.ProtocolVersion = 4
	go cl.WriteLoop()
	defer cl.Stop(nil)

	sub := packets.Subscription{Filter: "a/b", Qos: 0}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   "a/b",
		Payload:     []byte("hello world"),
		Created:     1,
	}

	publish := func() {
		for {
			_, err := s.publishToClient(cl, sub, pk)
			if err == nil {
				return
			}
			if !errors.Is(err, packets.ErrPendingClientWritesExceeded) {
				b.Fatal(err)
			}
			runtime.Gosched()
		}
	}

	b.ReportAllocs()
	b.ResetTimer()
	if producers == 1 {
		for i := 0; i < b.N; i++ {
			publish()
		}
	} else {
		b.SetParallelism(producers)
		b.RunParallel(func(p *testing.PB) {
			for p.Next() {
				publish()
			}
		})
	}
	for atomic.LoadInt32(&cl.State.outboundQty) > 0 {
		runtime.Gosched()
	}
	b.StopTimer()
}

func BenchmarkPublishToClient(b *testing.B) { benchPublishToClient(b, 1) }

func BenchmarkPublishToClientParallel(b *testing.B) { benchPublishToClient(b, 4) }
