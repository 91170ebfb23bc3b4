// SPDX-License-Identifier: MIT

package mqtt

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, client net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server, err = ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return server, client
}

// TestWriteConnWaitsForFullSocket (patch 97): a write larger than the
// socket's buffers, to a client that reads only later, waits in the
// runtime's poller (the raw write returned EAGAIN) and delivers every byte
// in order once the client reads; the buffer is emptied. A write to the
// closed connection fails with net.ErrClosed, as net.Conn.Write does.
// Does not build without the patch (writeConn is new); the speed-up itself
// is measured by scripts/cost-ab.sh, see PATCHES.md.
func TestWriteConnWaitsForFullSocket(t *testing.T) {
	server, client := tcpPair(t)
	s := newServer()
	cl := s.NewClient(server, "t", "sub", false)
	require.NotNil(t, cl.Net.bconn.rc, "a TCP connection takes the raw path")

	want := make([]byte, 16<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	buf := bytes.NewBuffer(append([]byte(nil), want...))
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := cl.writeConn(buf)
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("16 MiB written before the client read anything: %d, %v", r.n, r.err)
	case <-time.After(200 * time.Millisecond): // an absence: the write waits for the reader
	}

	got := make([]byte, len(want))
	_, err := io.ReadFull(client, got)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "bytes delivered in order")
	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, int64(len(want)), r.n)
	require.Zero(t, buf.Len(), "buffer emptied")

	require.NoError(t, server.Close())
	_, err = cl.writeConn(bytes.NewBufferString("x"))
	require.True(t, errors.Is(err, net.ErrClosed), "got %v", err)
}

// TestWriteConnPeerGone (patch 97): writing to a connection whose peer
// closed fails with the system's error (EPIPE or ECONNRESET), wrapped as
// net.Conn.Write wraps it, and does not kill the process with SIGPIPE.
func TestWriteConnPeerGone(t *testing.T) {
	server, client := tcpPair(t)
	s := newServer()
	cl := s.NewClient(server, "t", "sub", false)
	require.NoError(t, client.Close())
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := cl.writeConn(bytes.NewBufferString("hello"))
		if err != nil {
			var op *net.OpError
			require.True(t, errors.As(err, &op), "got %T %v", err, err)
			require.Equal(t, "write", op.Op)
			return
		}
		require.True(t, time.Now().Before(deadline), "writes to a closed peer kept succeeding")
		time.Sleep(10 * time.Millisecond)
	}
}
