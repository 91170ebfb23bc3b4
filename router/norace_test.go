//go:build !race

package router_test

// raceScale stretches the tests' waits under the race detector; see
// race_test.go.
const raceScale = 1
