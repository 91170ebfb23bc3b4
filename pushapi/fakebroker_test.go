package pushapi_test

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// fakeBroker is a scripted MQTT 5 server that is a broker member of the
// gossip cluster, for the publisher's edge cases: it answers CONNECT, hands
// every PUBLISH to the test, and acknowledges as told (at once, held until
// release, or with a reason code), so the tests see exactly when the push
// API answers relative to the acknowledgement.
type fakeBroker struct {
	t         testing.TB
	ln        net.Listener
	node      *cluster.Node
	connects  chan *packets.Connect
	publishes chan *packets.Publish

	mu        sync.Mutex
	conn      net.Conn   // the current connection
	wmu       sync.Mutex // serializes writes to conn
	hold      bool       // keep acknowledgements until release
	held      []*packets.Publish
	reason    byte          // reason code of acknowledgements
	maxPacket uint32        // Maximum Packet Size in the CONNACK; 0: none
	stalled   chan struct{} // while not nil, the connection stops reading until it is closed
	wg        sync.WaitGroup
}

// startFakeBroker starts a fake broker named name as a new gossip cluster.
func startFakeBroker(t testing.TB, name string) *fakeBroker {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeBroker{t: t, ln: ln, connects: make(chan *packets.Connect, 16), publishes: make(chan *packets.Publish, 10000)}
	node, err := cluster.New(cluster.Options{NodeName: name, BindAddr: "127.0.0.1:0", Timing: cluster.TimingFast, Secret: testSecret,
		Tags: cluster.Tags{Role: cluster.RoleBroker, MQTT: ln.Addr().String(), Admin: "127.0.0.1:1", Capacity: 1000, LoadAt: time.Now().Unix()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.node = node
	f.wg.Add(1)
	go f.accept()
	t.Cleanup(f.stop)
	return f
}

func (f *fakeBroker) stop() {
	f.resume()
	_ = f.ln.Close()
	f.drop()
	f.wg.Wait()
	_ = f.node.Shutdown()
}

func (f *fakeBroker) accept() {
	defer f.wg.Done()
	for {
		conn, err := f.ln.Accept()
		if err != nil {
			return
		}
		// A small receive buffer (no autotuning): a stalled connection
		// fills up after little data.
		_ = conn.(*net.TCPConn).SetReadBuffer(16 << 10)
		f.mu.Lock()
		f.conn = conn
		f.mu.Unlock()
		f.wg.Add(1)
		go f.serve(conn)
	}
}

// set changes how the fake acknowledges from now on.
func (f *fakeBroker) set(hold bool, reason byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold, f.reason = hold, reason
}

// stall makes the current connection stop reading after the next packet,
// until resume: the push API's writes then fill the socket buffers and
// block.
func (f *fakeBroker) stall() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stalled == nil {
		f.stalled = make(chan struct{})
	}
}

// resume ends a stall.
func (f *fakeBroker) resume() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stalled != nil {
		close(f.stalled)
		f.stalled = nil
	}
}

// release acknowledges the held messages, in order, and stops holding.
func (f *fakeBroker) release() {
	f.mu.Lock()
	held, conn, reason := f.held, f.conn, f.reason
	f.held, f.hold = nil, false
	f.mu.Unlock()
	for _, p := range held {
		f.ack(conn, p, reason)
	}
}

// drop closes the current connection without a DISCONNECT.
func (f *fakeBroker) drop() {
	f.mu.Lock()
	conn := f.conn
	f.held = nil
	f.mu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
}

func (f *fakeBroker) write(conn net.Conn, p io.WriterTo) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	_, _ = p.WriteTo(conn)
}

func (f *fakeBroker) ack(conn net.Conn, p *packets.Publish, reason byte) {
	switch p.QoS {
	case 1:
		f.write(conn, &packets.Puback{PacketID: p.PacketID, ReasonCode: reason})
	case 2:
		f.write(conn, &packets.Pubrec{PacketID: p.PacketID, ReasonCode: reason})
	}
}

func (f *fakeBroker) serve(conn net.Conn) {
	defer f.wg.Done()
	defer conn.Close()
	cp, err := packets.ReadPacket(conn)
	if err != nil || cp.Type != packets.CONNECT {
		return
	}
	f.connects <- cp.Content.(*packets.Connect)
	f.mu.Lock()
	props := &packets.Properties{ReceiveMaximum: ptr(uint16(1000))}
	if f.maxPacket > 0 {
		props.MaximumPacketSize = ptr(f.maxPacket)
	}
	f.mu.Unlock()
	f.write(conn, &packets.Connack{ReasonCode: 0, Properties: props})
	for {
		f.mu.Lock()
		stalled := f.stalled
		f.mu.Unlock()
		if stalled != nil {
			<-stalled
		}
		cp, err := packets.ReadPacket(conn)
		if err != nil {
			return
		}
		switch p := cp.Content.(type) {
		case *packets.Publish:
			f.publishes <- p
			f.mu.Lock()
			hold, reason := f.hold, f.reason
			if hold {
				f.held = append(f.held, p)
			}
			f.mu.Unlock()
			if !hold {
				f.ack(conn, p, reason)
			}
		case *packets.Pubrel:
			f.write(conn, &packets.Pubcomp{PacketID: p.PacketID})
		case *packets.Pingreq:
			f.write(conn, packets.NewControlPacket(packets.PINGRESP))
		case *packets.Disconnect:
			return
		}
	}
}

// nextPublish returns the next PUBLISH the fake received. It takes the
// calling (sub)test: FailNow must be called by the test that runs.
func (f *fakeBroker) nextPublish(t testing.TB) *packets.Publish {
	t.Helper()
	select {
	case p := <-f.publishes:
		return p
	case <-time.After(waitMsg):
		t.Fatalf("fake broker: no PUBLISH within %v", waitMsg)
		return nil
	}
}

// nextConnect returns the next CONNECT the fake received.
func (f *fakeBroker) nextConnect(t testing.TB) *packets.Connect {
	t.Helper()
	select {
	case c := <-f.connects:
		return c
	case <-time.After(waitCond):
		t.Fatalf("fake broker: no CONNECT within %v", waitCond)
		return nil
	}
}

// async runs an HTTP request in the background; its answer and duration
// arrive on the channel.
func async(a *testAPI, method, path string, body any) <-chan timed {
	ch := make(chan timed, 1)
	start := time.Now()
	go func() {
		r := a.rawNoFatal(method, path, body)
		ch <- timed{r, time.Since(start)}
	}()
	return ch
}

type timed struct {
	response
	took time.Duration
}

// rawNoFatal is do for other goroutines: a transport error becomes status 0.
func (a *testAPI) rawNoFatal(method, path string, body any) response {
	r, err := a.send(method, path, apiKey, body, nil)
	if err != nil {
		return response{body: []byte(err.Error())}
	}
	return r
}

// waitAnswer waits for an async answer.
func waitAnswer(t testing.TB, ch <-chan timed) timed {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitCond):
		t.Fatalf("no answer within %v", waitCond)
		return timed{}
	}
}

// pending fails the test if the async request has been answered.
func pending(t testing.TB, ch <-chan timed, what string) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("%s: answered %s already", what, r.response)
	default:
	}
}
