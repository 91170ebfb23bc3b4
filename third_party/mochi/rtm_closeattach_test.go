// SPDX-License-Identifier: MIT

package mqtt

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestEstablishAfterCloseRefused (patch 124): a connection a listener hands
// over once Close has begun (a WebSocket upgraded while its HTTP server shuts
// down) is refused at once and closed. v2.7.9 attached and served it on a
// stopped server, and its ClientsWg.Add raced Close's Wait (the race
// detector caught it in rtm's WebSocket listener tests).
func TestEstablishAfterCloseRefused(t *testing.T) {
	s := newServer()
	require.NoError(t, s.Serve())
	require.NoError(t, s.Close())

	r, w := net.Pipe()
	defer r.Close()
	done := make(chan error, 1)
	go func() { done <- s.EstablishConnection("tcp", w) }()
	select {
	case err := <-done:
		require.ErrorIs(t, err, packets.ErrServerShuttingDown)
	case <-time.After(2 * time.Second):
		t.Fatal("a connection handed over after Close is served: EstablishConnection still running")
	}
	// The refused connection is closed: the peer reads EOF, no CONNACK.
	_ = r.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := r.Read(make([]byte, 1))
	require.Error(t, err)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the refused connection is left open")
	}
}
