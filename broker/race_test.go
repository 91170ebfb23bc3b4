//go:build race

package broker_test

// raceScale stretches the tests' timeouts under the race detector, which
// slows the broker and the clients several times over (STYLE 42).
const raceScale = 4
