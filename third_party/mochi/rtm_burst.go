// SPDX-License-Identifier: MIT
// rtm patch 109: a busy connection's packets are read and handled within one
// syscall.RawConn.Read, see PATCHES.md.

package mqtt

import (
	"errors"
	"os"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// burstSpan bounds a burst: its read deadline. A wait of idleHandOff or more
// then ends in the read loop, which hands the packet after it to a helper
// (patch 75), parks the connection (patch 86) and keeps the keepalive
// deadline, as for any connection; a busy one leaves and re-enters a burst
// once per burstSpan.
const burstSpan = idleHandOff

// readBurst reads and handles the packets that follow each other on cl's
// connection, without leaving one RawConn.Read (connReader.burst), until
// the connection is idle for burstSpan, a packet is longer than the read
// buffer, cl is stopped, or reading or handling fails. It returns when the
// last wait began (the read loop's next wait counts from it) and the error
// of handling a packet or of the wait (a closed connection); a read(2)
// error is left for the read loop's next read, after the bytes buffered.
// rtm patch 109.
func (cl *Client) readBurst(packetHandler ReadFn) (waitFrom time.Time, err error) {
	r := cl.Net.bconn
	waitFrom = time.Now()
	// The keepalive bound counts from the wait (refreshDeadline); the burst
	// reads under its own, shorter one.
	expiry := cl.refreshDeadlineFrom(waitFrom, cl.State.Keepalive)
	if end := waitFrom.Add(burstSpan); expiry.IsZero() || end.Before(expiry) {
		_ = cl.Net.Conn.SetReadDeadline(end)
	}
	rerr := r.burst(func() bool {
		for cl.nextPacketBuffered() { // readAndHandle ignores a packet read after a stop
			var fh packets.FixedHeader
			if err = cl.ReadFixedHeader(&fh); err != nil {
				return false
			}
			if err = cl.readAndHandle(&fh, packetHandler); err != nil {
				return false
			}
		}
		waitFrom = time.Now()
		return !cl.Closed() && r.partFits()
	})
	if err == nil && rerr != nil && !errors.Is(rerr, os.ErrDeadlineExceeded) {
		// Closed while waiting: the error a waiting read returns outside a
		// burst (fillRaw's), so the server sends the will as it does then;
		// the read loop would take a stopped client for a clean end.
		err = rerr
	}
	return waitFrom, err
}
