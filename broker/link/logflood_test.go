package link

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestFailedHandshakesDoNotFloodTheLog: anyone who reaches the link port
// can fail handshakes by the thousand; each is counted, but the log gets
// the first at once and then at most one line a second (it got one line
// per socket: 3,000 lines from 3,000 idle sockets).
func TestFailedHandshakesDoNotFloodTheLog(t *testing.T) {
	cfg := testConfig(t, "b")
	log, buf := testutil.Logger(t)
	t.Cleanup(buf.Stop)
	cfg.Logger = log
	s := startServer(t, cfg, &recorder{})
	const n = 200
	start := time.Now()
	for range n {
		conn, err := net.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		_ = conn.Close()
	}
	waitFor(t, 10*time.Second, func() error {
		if f := s.Stats().AuthFailures; f < n {
			return fmt.Errorf("%d handshake failures counted, want %d", f, n)
		}
		return nil
	})
	elapsed := time.Since(start)
	lines := buf.Count("link handshake failed")
	if max := 1 + int(elapsed/failLogInterval) + 1; lines == 0 || lines > max {
		t.Fatalf("%d failed handshakes in %v logged as %d lines, want 1 to %d", n, elapsed, lines, max)
	}
}
