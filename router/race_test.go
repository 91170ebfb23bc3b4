//go:build race

package router_test

// raceScale stretches the tests' waits under the race detector, which slows
// brokers and gossip several times over (STYLE 42). The bounds the tests
// assert (how fast the router reacts) are not scaled.
const raceScale = 4
