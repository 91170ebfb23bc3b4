//go:build !race

package mochifix_test

// raceEnabled: see race_test.go.
const raceEnabled = false
