package testutil

import (
	"net"
	"sync"
	"testing"
	"time"
)

// TCPProxy forwards loopback TCP connections to a target and can cut every
// connection it holds, to break a node link mid-stream. It keeps accepting
// after a cut.
type TCPProxy struct {
	ln net.Listener

	mu       sync.Mutex
	target   string
	conns    map[net.Conn]struct{} // both ends of every live pair
	pairs    int                   // live pairs
	total    int                   // pairs accepted
	cutTotal int                   // pairs cut
	held     [2]chan struct{}      // by direction: while not nil, copying waits until it is closed
	wg       sync.WaitGroup
}

// NewTCPProxy starts a proxy on a loopback port; it forwards nothing
// until SetTarget. It stops when the test ends.
func NewTCPProxy(t testing.TB) *TCPProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &TCPProxy{ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.Cut()
		p.wg.Wait()
	})
	return p
}

// Addr is where clients connect.
func (p *TCPProxy) Addr() string { return p.ln.Addr().String() }

// SetTarget sets where connections go; until it is set they are closed.
func (p *TCPProxy) SetTarget(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = addr
}

func (p *TCPProxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		if target == "" {
			in.Close()
			continue
		}
		out, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns[in], p.conns[out] = struct{}{}, struct{}{}
		p.pairs++
		p.total++
		p.mu.Unlock()
		var once sync.Once
		done := func() {
			once.Do(func() {
				in.Close()
				out.Close()
				p.mu.Lock()
				if _, ok := p.conns[in]; ok {
					p.pairs--
				}
				delete(p.conns, in)
				delete(p.conns, out)
				p.mu.Unlock()
			})
		}
		p.wg.Add(2)
		go func() { defer p.wg.Done(); p.copy(ToTarget, out, in); done() }()
		go func() { defer p.wg.Done(); p.copy(FromTarget, in, out); done() }()
	}
}

// Directions of a proxied connection.
const (
	ToTarget   = 0 // for a node link: the dialer's messages
	FromTarget = 1 // for a node link: the receiver's acks
)

// copy copies src to dst, waiting while direction dir is held.
func (p *TCPProxy) copy(dir int, dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			held := p.held[dir]
			p.mu.Unlock()
			if held != nil {
				<-held
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Hold stops copying in direction dir until the next cut, which drops what
// was held back.
func (p *TCPProxy) Hold(dir int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held[dir] == nil {
		p.held[dir] = make(chan struct{})
	}
}

// Cut closes every connection the proxy holds; replies held back are
// dropped with them.
func (p *TCPProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
	p.cutTotal += p.pairs
	p.pairs = 0
	for dir, held := range p.held {
		if held != nil {
			close(held)
			p.held[dir] = nil
		}
	}
}

// Active is the number of live proxied connections.
func (p *TCPProxy) Active() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pairs
}

// Accepted is the number of connections proxied so far.
func (p *TCPProxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total
}

// CutConns is the number of connections Cut closed.
func (p *TCPProxy) CutConns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cutTotal
}
