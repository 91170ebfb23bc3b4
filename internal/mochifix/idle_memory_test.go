package mochifix_test

import (
	"bytes"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"
)

// v311Connect returns an MQTT 3.1.1 CONNECT packet (clean session, keepalive
// 60s) for the client id.
func v311Connect(id string) []byte {
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, byte(len(id))}
	body = append(body, id...)
	return append([]byte{0x10, byte(len(body))}, body...)
}

// TestIdleConnectionMemory connects idle MQTT clients to a live broker and
// measures what each costs the process: heap (Client, maps, bufio.Reader,
// outbound queue, net.Conn) and goroutine stacks (the read loop and the
// WriteLoop). The client side of each TCP connection lives in this process
// too; it is a bare net.Conn with no goroutine and is counted in (slightly
// overstating the broker's share).
//
// rtm's target is under 10 KiB per idle connection. On v2.7.9 the outbound
// channel alone was 64 KiB of heap per connection (8192 slots of 8 bytes).
func TestIdleConnectionMemory(t *testing.T) {
	const n = 500
	if path := os.Getenv("MOCHIFIX_HEAP_PROFILE"); path != "" {
		// go tool pprof -sample_index=inuse_space -top $path
		runtime.MemProfileRate = 1
		defer func() { runtime.MemProfileRate = 512 * 1024 }()
		defer writeHeapProfile(t, path) // runs before the connections close
	}
	_, addr, _ := startBroker(t, nil)

	measure := func() (heap, stack uint64) {
		var ms runtime.MemStats
		for i := 0; i < 3; i++ {
			runtime.GC()
		}
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc, ms.StackInuse
	}

	// Warm up: one connection, so lazily initialised globals are not counted.
	warm, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	readConnack(t, warm, "warm")
	defer warm.Close()

	heap0, stack0 := measure()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		readConnack(t, c, "idle-"+itoa(i))
	}
	time.Sleep(200 * time.Millisecond) // let every WriteLoop park
	heap1, stack1 := measure()

	perHeap := float64(heap1-heap0) / n
	perStack := float64(stack1-stack0) / n
	t.Logf("per idle connection: heap %.0f B, goroutine stacks %.0f B, total %.1f KiB",
		perHeap, perStack, (perHeap+perStack)/1024)

	// The heap part is what rtm's outbound queue patch addresses; it must stay
	// under rtm's 10 KiB target. The stacks (about 16 KiB for the read
	// goroutine, 4 KiB for the WriteLoop) are mochi's goroutine-per-direction
	// design and are reported, not asserted; see PATCHES.md.
	if perHeap > 10*1024 {
		t.Errorf("idle connection heap %.1f KiB, target < 10 KiB", perHeap/1024)
	}
}

func readConnack(t *testing.T, c net.Conn, id string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(v311Connect(id)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("%s: connack: %v", id, err)
	}
	if !bytes.Equal(ack, []byte{0x20, 2, 0, 0}) {
		t.Fatalf("%s: unexpected connack % x", id, ack)
	}
	_ = c.SetDeadline(time.Time{})
}

func itoa(i int) string {
	var b [20]byte
	p := len(b)
	for {
		p--
		b[p] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			return string(b[p:])
		}
	}
}

func writeHeapProfile(t *testing.T, path string) {
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		t.Error(err)
		return
	}
	defer f.Close()
	if err := pprof.WriteHeapProfile(f); err != nil {
		t.Error(err)
	}
}
