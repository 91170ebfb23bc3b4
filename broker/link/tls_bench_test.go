package link

import (
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkLinkThroughput measures one link alone (loopback, one sender,
// reliable messages, acknowledged) in plaintext and with TLS keyed by the
// secret: what link TLS costs without the brokers around it. Run with
// go test -run '^$' -bench LinkThroughput ./broker/link.
func BenchmarkLinkThroughput(b *testing.B) {
	for _, size := range []int{64, 1024, 16 << 10} {
		for _, mode := range []string{"plaintext", "tls"} {
			b.Run(fmt.Sprintf("%s/%dB", mode, size), func(b *testing.B) {
				var got atomic.Int64
				want := int64(b.N)
				done := make(chan struct{})
				h := HandlerFunc(func(string, Message) {
					if got.Add(1) == want {
						close(done)
					}
				})
				sc, dc := testConfig(b, "b"), testConfig(b, "a")
				if mode == "tls" {
					t, err := SecretTLS(testSecret)
					if err != nil {
						b.Fatal(err)
					}
					sc.TLS, dc.TLS = t, t
				}
				dc.QueueBytes = 256 << 20
				s := startServer(b, sc, h)
				l := dial(b, "b", s.Addr(), dc, nil)
				waitUp(b, l)
				body := make([]byte, size)
				b.SetBytes(int64(size))
				b.ResetTimer()
				for range b.N {
					for {
						err := l.Queue(Message{Type: typeData, Body: body}, true)
						if err == nil {
							break
						}
						if !errors.Is(err, ErrQueueFull) {
							b.Fatal(err)
						}
						time.Sleep(50 * time.Microsecond)
					}
				}
				select {
				case <-done:
				case <-time.After(time.Minute):
					b.Fatalf("delivered %d of %d", got.Load(), want)
				}
			})
		}
	}
}
