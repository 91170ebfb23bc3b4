//go:build !race

package pushapi_test

// raceScale stretches the tests' waits under the race detector; see
// race_test.go.
const raceScale = 1
