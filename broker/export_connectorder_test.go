package broker

import "time"

// SetTestWallClockSkew runs the node's wall clock d ahead (negative:
// behind) of the others', as an unsynchronised clock would; durations it
// measures (monotonic) are not affected.
func (b *Broker) SetTestWallClockSkew(d time.Duration) {
	b.cluster.owners.testWallSkew.Store(int64(d))
}
