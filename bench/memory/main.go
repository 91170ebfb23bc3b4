// Command memory opens many idle MQTT 3.1.1 connections to a broker on the
// loopback interface, holds them, then closes them all and exits. It is the
// load half of scripts/memory.sh, which measures the broker's resident
// memory per idle connection.
//
//	go run ./bench/memory -addr 127.0.0.1:1883 -n 10000 -hold 60s
//
// Each connection sends one CONNECT (clean session, keepalive -keepalive,
// client id <prefix>-<i>) and checks that the CONNACK's return code is 0;
// after that nothing is sent except PINGREQs when -hold outlasts half the
// keepalive. Connections are opened -c at a time. When all are open it
// prints a line starting with "connected", and after -hold (or SIGINT or
// SIGTERM) it closes them and prints "closed". The exit code is 1 if any
// connection failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:1883", "broker address; must be a loopback address")
	n := flag.Int("n", 10000, "number of connections")
	conc := flag.Int("c", 50, "connections opened concurrently")
	hold := flag.Duration("hold", 60*time.Second, "how long to hold the connections once all are open (at most 1h)")
	keepalive := flag.Int("keepalive", 300, "MQTT keepalive in seconds sent in CONNECT (0-65535)")
	prefix := flag.String("prefix", "", "client id prefix (default: mem<pid>)")
	timeout := flag.Duration("timeout", 10*time.Second, "bound on dialling plus CONNECT/CONNACK of one connection")
	flag.Parse()

	if err := run(*addr, *n, *conc, *hold, *keepalive, *prefix, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "memory:", err)
		os.Exit(1)
	}
}

func run(addr string, n, conc int, hold time.Duration, keepalive int, prefix string, timeout time.Duration) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-addr %q: only loopback IP addresses are allowed", addr)
	}
	switch {
	case n < 1:
		return errors.New("-n must be at least 1")
	case conc < 1:
		return errors.New("-c must be at least 1")
	case hold < 0 || hold > time.Hour:
		return errors.New("-hold must be between 0 and 1h")
	case keepalive < 0 || keepalive > 65535:
		return errors.New("-keepalive must be between 0 and 65535")
	}
	if prefix == "" {
		prefix = fmt.Sprintf("mem%d", os.Getpid())
	}

	soft, hard, err := raiseNoFile()
	if err != nil {
		return fmt.Errorf("raising the open file limit: %w", err)
	}
	if uint64(n)+64 > soft {
		return fmt.Errorf("-n %d needs more open files than the limit (soft %d, hard %d)", n, soft, hard)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	conns := make([]net.Conn, n)
	var failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for i := 0; i < n && ctx.Err() == nil; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			c, err := connect(addr, fmt.Sprintf("%s-%d", prefix, i), uint16(keepalive), timeout)
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Errorf("connection %d: %w", i, err))
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	open := 0
	for _, c := range conns {
		if c != nil {
			open++
		}
	}
	fmt.Printf("connected %d/%d in %.2fs (failed %d)\n", open, n, time.Since(start).Seconds(), failed.Load())
	if e, ok := firstErr.Load().(error); ok {
		fmt.Fprintln(os.Stderr, "first error:", e)
	}

	if ctx.Err() == nil && hold > 0 {
		fmt.Printf("holding for %s\n", hold)
		holdConns(ctx, conns, hold, keepalive)
	}

	closeStart := time.Now()
	for _, c := range conns {
		if c != nil {
			_ = c.Close()
		}
	}
	fmt.Printf("closed %d in %.2fs\n", open, time.Since(closeStart).Seconds())
	if failed.Load() > 0 {
		return fmt.Errorf("%d of %d connections failed", failed.Load(), n)
	}
	return nil
}

// raiseNoFile raises the soft open file limit to the hard limit.
func raiseNoFile() (soft, hard uint64, err error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, 0, err
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, 0, err
		}
	}
	return lim.Cur, lim.Max, nil
}

// connect dials addr, sends an MQTT 3.1.1 CONNECT with clean session and
// reads the 4-byte CONNACK, which must accept the connection.
func connect(addr, clientID string, keepalive uint16, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(connectPacket(clientID, keepalive)); err != nil {
		c.Close()
		return nil, fmt.Errorf("writing CONNECT: %w", err)
	}
	var ack [4]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("reading CONNACK: %w", err)
	}
	if ack[0] != 0x20 || ack[1] != 0x02 {
		c.Close()
		return nil, fmt.Errorf("not a CONNACK: % x", ack)
	}
	if ack[3] != 0 {
		c.Close()
		return nil, fmt.Errorf("CONNACK return code %d", ack[3])
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// connectPacket encodes an MQTT 3.1.1 CONNECT packet: protocol MQTT level 4,
// clean session, no will, no credentials.
func connectPacket(clientID string, keepalive uint16) []byte {
	var body []byte
	body = append(body, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02)
	body = append(body, byte(keepalive>>8), byte(keepalive))
	body = append(body, byte(len(clientID)>>8), byte(len(clientID)))
	body = append(body, clientID...)

	pk := []byte{0x10}
	for l := len(body); ; {
		b := byte(l % 128)
		l /= 128
		if l > 0 {
			b |= 0x80
		}
		pk = append(pk, b)
		if l == 0 {
			break
		}
	}
	return append(pk, body...)
}

// holdConns waits for hold or ctx, sending a PINGREQ on every connection
// every keepalive/2 seconds so that the broker does not time them out, and
// draining the PINGRESPs.
func holdConns(ctx context.Context, conns []net.Conn, hold time.Duration, keepalive int) {
	timer := time.NewTimer(hold)
	defer timer.Stop()
	var tick <-chan time.Time
	if keepalive > 0 && hold >= time.Duration(keepalive)*time.Second/2 {
		t := time.NewTicker(time.Duration(keepalive) * time.Second / 2)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			return
		case <-tick:
			ping(conns)
		}
	}
}

func ping(conns []net.Conn) {
	for _, c := range conns {
		if c == nil {
			continue
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte{0xC0, 0x00}); err == nil {
			var resp [2]byte // PINGRESP; nothing else arrives without subscriptions
			_, _ = io.ReadFull(c, resp[:])
		}
		_ = c.SetDeadline(time.Time{})
	}
}
