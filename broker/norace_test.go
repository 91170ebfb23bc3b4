//go:build !race

package broker_test

// raceScale stretches the tests' timeouts under the race detector; see
// race_test.go.
const raceScale = 1
