package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
)

// The payload of every message: publisher, sequence number, and the
// publisher's connection number (so an inversion can be told apart from
// one across a reconnect of the publisher).
const payloadLen = 16

func encode(pub int, seq uint64, conn int) []byte {
	b := make([]byte, payloadLen)
	binary.BigEndian.PutUint32(b, uint32(pub))
	binary.BigEndian.PutUint64(b[4:], seq)
	binary.BigEndian.PutUint32(b[12:], uint32(conn))
	return b
}

func decode(b []byte) (pub int, seq uint64, conn int, ok bool) {
	if len(b) != payloadLen {
		return 0, 0, 0, false
	}
	return int(binary.BigEndian.Uint32(b)), binary.BigEndian.Uint64(b[4:]), int(binary.BigEndian.Uint32(b[12:])), true
}

// span is one connection of a client: to which node, from when to when
// (harness time; to is 0 while it lasts).
type span struct {
	Node     string        `json:"node"`
	From     time.Duration `json:"from_ns"`
	To       time.Duration `json:"to_ns"`
	Present  bool          `json:"session_present"`
	Attempts int           `json:"attempts"` // failed CONNECTs before this one
}

type spans struct {
	mu sync.Mutex
	l  []span
}

func (s *spans) open(node string, present bool, attempts int) {
	s.mu.Lock()
	s.l = append(s.l, span{Node: node, From: since(), Present: present, Attempts: attempts})
	s.mu.Unlock()
}

func (s *spans) close() {
	s.mu.Lock()
	if n := len(s.l); n > 0 && s.l[n-1].To == 0 {
		s.l[n-1].To = since()
	}
	s.mu.Unlock()
}

// at names the node the client was connected to at t, or "-".
func (s *spans) at(t time.Duration) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range s.l {
		if sp.From <= t && (sp.To == 0 || t < sp.To) {
			return sp.Node
		}
	}
	return "-"
}

var epoch = time.Now()

func since() time.Duration { return time.Since(epoch) }

// picker chooses the node a client connects to: through the router if
// there is one, else the next node in turn (a client does not know which
// nodes are alive; a dead one refuses, a stopped one times out).
type picker struct {
	c *cluster
}

func (p picker) pick(ctx context.Context, id string, try int) (addr, name string, err error) {
	if p.c.router == "" {
		n := p.c.nodes[try%len(p.c.nodes)]
		return n.addr(), n.name, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.c.router+"/v1/route?client_id="+id, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", "", fmt.Errorf("router: %s", resp.Status)
	}
	var r struct {
		Node string `json:"node"`
		Host string `json:"host"`
		Port int    `json:"port"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return "", "", err
	}
	return net.JoinHostPort(r.Host, strconv.Itoa(r.Port)), r.Node, nil
}

// ack is what a publisher knows of one acknowledged message.
type ack struct {
	seq  uint64
	at   time.Duration // when its PUBACK arrived
	node string        // the node that acknowledged it
	conn int
}

// publisher sends QoS 1 messages numbered 1, 2, ... on chaos/p<id>, at most
// window unacknowledged, over MQTT 3.1.1 (paho.mqtt.golang writes in call
// order, so the broker reads them in sequence order). When its connection
// ends it connects to another node and goes on with new numbers: what was
// not acknowledged is not counted (it may or may not arrive).
type publisher struct {
	id    int
	sent  atomic.Int64
	conns spans

	mu    sync.Mutex
	acked []ack
	nAck  atomic.Int64
	fails atomic.Int64 // publishes that ended without a PUBACK
}

func (p *publisher) topic() string { return fmt.Sprintf("chaos/p%d", p.id) }

func (p *publisher) run(ctx context.Context, pk picker, rate float64, window int) {
	var seq uint64
	var wg sync.WaitGroup
	defer wg.Wait()
	interval := time.Duration(float64(time.Second) / rate)
	id := fmt.Sprintf("chaos-pub-%d", p.id)
	conn := 0
	attempts := 0
	for try := p.id; ctx.Err() == nil; try++ {
		addr, name, err := pk.pick(ctx, id, try)
		if err != nil {
			attempts++
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		lost := make(chan struct{})
		var once sync.Once
		opts := mqtt3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetCleanSession(true).
			SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(3 * time.Second).
			SetKeepAlive(5 * time.Second).SetPingTimeout(3 * time.Second).SetWriteTimeout(5 * time.Second).
			SetConnectionLostHandler(func(mqtt3.Client, error) { once.Do(func() { close(lost) }) })
		c := mqtt3.NewClient(opts)
		tok := c.Connect()
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			c.Disconnect(0)
			attempts++
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		conn++
		p.conns.open(name, false, attempts)
		attempts = 0
		sem := make(chan struct{}, window)
		tick := time.NewTicker(interval)
	send:
		for {
			select {
			case <-ctx.Done():
				break send
			case <-lost:
				break send
			case <-tick.C:
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				break send
			case <-lost:
				break send
			}
			seq++
			s, cn := seq, conn
			t := c.Publish(p.topic(), 1, false, encode(p.id, s, cn))
			p.sent.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if t.WaitTimeout(30*time.Second) && t.Error() == nil {
					p.mu.Lock()
					p.acked = append(p.acked, ack{seq: s, at: since(), node: name, conn: cn})
					p.mu.Unlock()
					p.nAck.Add(1)
				} else {
					p.fails.Add(1)
				}
			}()
		}
		tick.Stop()
		if ctx.Err() != nil {
			// The end of the run: what is in flight may still be
			// acknowledged.
			for range window {
				select {
				case sem <- struct{}{}:
				case <-lost:
				case <-time.After(30 * time.Second):
				}
			}
		}
		c.Disconnect(100)
		p.conns.close()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// subscriber is a persistent session subscribed to chaos/#: MQTT 5 (clean
// start false, session expiry) or MQTT 3.1.1 (clean session false). It
// reconnects to another node whenever its connection ends, and resubscribes
// only when a reconnect finds no session (counted: a session lost).
type subscriber struct {
	id    int
	name  string
	v3    bool
	slow  time.Duration // a pause per message received: a slow reader
	conns spans

	connected atomic.Bool
	delivered atomic.Int64
	last      atomic.Int64 // since() of the latest delivery
	noSession atomic.Int64 // reconnects that found no session
	failed    atomic.Int64 // CONNECTs that failed or were refused

	mu    sync.Mutex
	got   map[[2]uint64]int // (publisher, seq) → deliveries
	first map[int][]uint64  // publisher → seqs in order of first delivery
	fconn map[int][]int     // publisher → the publisher connection of each in first
	fat   map[int][]time.Duration
	fnode map[int][]string // the node the subscriber was connected to then
	node  string           // the node of the current connection
	bad   int              // payloads not of this harness

	// sub subscribes on the current connection (set by its dial).
	sub func(context.Context) error
}

func newSubscriber(id int, v3 bool, slow time.Duration) *subscriber {
	s := &subscriber{id: id, v3: v3, slow: slow, got: map[[2]uint64]int{}, first: map[int][]uint64{}, fconn: map[int][]int{},
		fat: map[int][]time.Duration{}, fnode: map[int][]string{}}
	kind := "v5"
	if v3 {
		kind = "v3"
	}
	s.name = fmt.Sprintf("chaos-sub-%d-%s", id, kind)
	return s
}

func (s *subscriber) record(payload []byte) {
	if s.slow > 0 {
		time.Sleep(s.slow)
	}
	pub, seq, conn, ok := decode(payload)
	s.mu.Lock()
	if !ok {
		s.bad++
		s.mu.Unlock()
		return
	}
	k := [2]uint64{uint64(pub), seq}
	s.got[k]++
	if s.got[k] == 1 {
		s.first[pub] = append(s.first[pub], seq)
		s.fconn[pub] = append(s.fconn[pub], conn)
		s.fat[pub] = append(s.fat[pub], since())
		s.fnode[pub] = append(s.fnode[pub], s.node)
	}
	s.mu.Unlock()
	s.delivered.Add(1)
	s.last.Store(int64(since()))
}

const filter = "chaos/#"

// run keeps the subscriber connected until ctx ends. subscribed is closed
// once its first SUBACK arrived.
func (s *subscriber) run(ctx context.Context, pk picker, subscribed chan<- error) {
	first := true
	attempts := 0
	for try := s.id; ctx.Err() == nil; try++ {
		addr, name, err := pk.pick(ctx, s.name, try)
		if err != nil {
			attempts++
			s.failed.Add(1)
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		var done <-chan struct{}
		var hangUp func()
		var present bool
		if s.v3 {
			done, hangUp, present, err = s.dial3(addr)
		} else {
			done, hangUp, present, err = s.dial5(ctx, addr)
		}
		if err == nil && (first || !present) {
			if !first {
				s.noSession.Add(1)
			}
			err = s.sub(ctx)
		}
		if err != nil {
			if hangUp != nil {
				hangUp()
			}
			attempts++
			s.failed.Add(1)
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		s.conns.open(name, present, attempts)
		s.mu.Lock()
		s.node = name
		s.mu.Unlock()
		attempts = 0
		if first {
			first = false
			subscribed <- nil
		}
		s.connected.Store(true)
		select {
		case <-ctx.Done():
		case <-done:
		}
		s.connected.Store(false)
		hangUp()
		s.conns.close()
	}
}

func (s *subscriber) dial5(ctx context.Context, addr string) (<-chan struct{}, func(), bool, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, nil, false, err
	}
	cfg := paho.ClientConfig{ClientID: s.name, Conn: conn, PacketTimeout: 10 * time.Second, OnClientError: func(error) {}}
	cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
		s.record(pr.Packet.Payload)
		return true, nil
	}}
	c := paho.NewClient(cfg)
	expiry := uint32(600)
	rm := uint16(1024)
	ca, err := c.Connect(dctx, &paho.Connect{ClientID: s.name, KeepAlive: 5, CleanStart: false,
		Properties: &paho.ConnectProperties{ReceiveMaximum: &rm, SessionExpiryInterval: &expiry}})
	if err != nil {
		_ = conn.Close()
		return nil, nil, false, err
	}
	s.sub = func(ctx context.Context) error {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		sa, err := c.Subscribe(sctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
		if err != nil {
			return err
		}
		if len(sa.Reasons) != 1 || sa.Reasons[0] != 1 {
			return fmt.Errorf("suback %v", sa.Reasons)
		}
		return nil
	}
	// A connection that goes silent (its node stopped) ends after the
	// keep alive: paho's pinger closes it.
	return c.Done(), func() { _ = c.Disconnect(&paho.Disconnect{}); _ = conn.Close() }, ca.SessionPresent, nil
}

func (s *subscriber) dial3(addr string) (<-chan struct{}, func(), bool, error) {
	lost := make(chan struct{})
	var once sync.Once
	handler := func(_ mqtt3.Client, m mqtt3.Message) { s.record(m.Payload()) }
	opts := mqtt3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(s.name).SetCleanSession(false).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(3 * time.Second).
		SetKeepAlive(5 * time.Second).SetPingTimeout(3 * time.Second).SetWriteTimeout(5 * time.Second).
		SetOrderMatters(true).SetDefaultPublishHandler(handler).
		SetConnectionLostHandler(func(mqtt3.Client, error) { once.Do(func() { close(lost) }) })
	c := mqtt3.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		c.Disconnect(0)
		if tok.Error() != nil {
			return nil, nil, false, tok.Error()
		}
		return nil, nil, false, fmt.Errorf("connect timed out")
	}
	present := tok.(*mqtt3.ConnectToken).SessionPresent()
	s.sub = func(context.Context) error {
		t := c.Subscribe(filter, 1, handler)
		if !t.WaitTimeout(10 * time.Second) {
			return fmt.Errorf("subscribe timed out")
		}
		return t.Error()
	}
	return lost, func() { c.Disconnect(100) }, present, nil
}
