//go:build race

package pushapi_test

// raceScale stretches the tests' waits under the race detector, which slows
// brokers, gossip and the store several times over (STYLE 42). The bounds
// the tests assert (how fast a request fails) are not scaled.
const raceScale = 4
