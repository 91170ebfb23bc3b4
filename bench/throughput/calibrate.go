package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/internal/loadgen"
)

// ceilings are the client's own limits on this machine, measured against a
// null broker that answers CONNECT and then only sinks or sources bytes: a
// broker measured near them is bounded by the client, not by itself.
type ceilings struct {
	send, recv float64 // QoS 0 messages/s
}

// calibrate measures the load generator client's QoS 0 publish rate (pubs
// publishers, msgs in all) and receive rate (one client, msgs) with payloads
// of size bytes.
func calibrate(ctx context.Context, pubs, msgs, size int) (ceilings, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var c ceilings

	// Send: publishers write into a sink.
	sink, err := startNullBroker(func(net.Conn) {})
	if err != nil {
		return c, err
	}
	defer sink.Close()
	clients := make([]*loadgen.Client, pubs)
	defer func() {
		for _, cl := range clients {
			if cl != nil {
				cl.Close()
			}
		}
	}()
	for i := range clients {
		if clients[i], err = loadgen.Dial(ctx, loadgen.ClientOptions{Addr: sink.Addr().String(), ClientID: fmt.Sprintf("cal-pub-%d", i), ReadBuffer: 512}); err != nil {
			return c, err
		}
	}
	var wg sync.WaitGroup
	start := time.Now()
	for i, pc := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic, payload := fmt.Sprintf("bench/%d", i), make([]byte, size)
			for range msgs / pubs {
				if err := pc.Publish(ctx, 0, topic, payload); err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	c.send = float64(msgs/pubs*pubs) / time.Since(start).Seconds()

	// Receive: the null broker writes msgs pre-encoded PUBLISH packets.
	pkt := encodePublish("bench/0", make([]byte, size))
	src, err := startNullBroker(func(conn net.Conn) {
		w := bufio.NewWriterSize(conn, 64<<10)
		for range msgs {
			if _, err := w.Write(pkt); err != nil {
				return
			}
		}
		_ = w.Flush()
	})
	if err != nil {
		return c, err
	}
	defer src.Close()
	tr := benchkit.NewTracker(int64(msgs))
	rc, err := loadgen.Dial(ctx, loadgen.ClientOptions{Addr: src.Addr().String(), ClientID: "cal-sub", OnPublish: func(_, _ []byte) { tr.Hit() }})
	if err != nil {
		return c, err
	}
	defer rc.Close()
	start = time.Now()
	select {
	case <-tr.Done():
	case <-ctx.Done():
		return c, fmt.Errorf("receive ceiling: %d of %d received: %w", tr.Received(), msgs, ctx.Err())
	}
	c.recv = float64(msgs) / time.Since(start).Seconds()
	return c, nil
}

// startNullBroker accepts MQTT 5 clients, answers CONNECT with a success
// CONNACK, runs after(conn), and discards whatever the client sends.
func startNullBroker(after func(net.Conn)) (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				r := bufio.NewReader(conn)
				if err := skipPacket(r); err != nil {
					return
				}
				// CONNACK: session present 0, reason 0, no properties.
				if _, err := conn.Write([]byte{0x20, 3, 0, 0, 0}); err != nil {
					return
				}
				go after(conn)
				_, _ = io.Copy(io.Discard, r)
			}()
		}
	}()
	return ln, nil
}

// skipPacket reads one MQTT packet and drops it.
func skipPacket(r *bufio.Reader) error {
	if _, err := r.ReadByte(); err != nil {
		return err
	}
	n, err := binary.ReadUvarint(r) // MQTT's variable byte integer is a uvarint
	if err != nil {
		return err
	}
	_, err = r.Discard(int(n))
	return err
}

// encodePublish returns a QoS 0 MQTT 5 PUBLISH packet without properties.
func encodePublish(topic string, payload []byte) []byte {
	body := binary.BigEndian.AppendUint16(nil, uint16(len(topic)))
	body = append(body, topic...)
	body = append(body, 0) // property length
	body = append(body, payload...)
	pkt := []byte{0x30}
	pkt = binary.AppendUvarint(pkt, uint64(len(body)))
	return append(pkt, body...)
}
