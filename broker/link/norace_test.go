//go:build !race

package link

// raceScale stretches the tests' timeouts under the race detector; see
// race_test.go.
const raceScale = 1
