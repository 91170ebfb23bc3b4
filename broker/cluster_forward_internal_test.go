package broker

import (
	"testing"
	"time"
)

// A publisher's acknowledgement waiting for a dead peer must outlast the
// failure detection that settles it, whatever cluster.probe_interval is:
// at 3 s a verdict takes about 18 s, and a 10 s bound closed every such
// publisher's connection first (review rv12).
func TestPeerAckWaitOutlastsFailureDetection(t *testing.T) {
	for _, c := range []struct{ probe, want time.Duration }{
		{200 * time.Millisecond, 10 * time.Second},
		{time.Second, 10 * time.Second},
		{3 * time.Second, 30 * time.Second},
	} {
		if got := peerAckWaitFor(c.probe); got != c.want {
			t.Errorf("probe interval %v: wait %v, want %v", c.probe, got, c.want)
		}
	}
}
