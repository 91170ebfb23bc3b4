// SPDX-License-Identifier: MIT
// rtm patch 70: allocation assertions are skipped under the race detector.

//go:build race

package mqtt

// raceEnabled: the race detector makes sync.Pool drop items at random, so
// pooled buffers are allocated again now and then.
const raceEnabled = true
