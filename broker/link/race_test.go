//go:build race

package link

// raceScale stretches the tests' timeouts under the race detector, which
// slows every goroutine several times over (STYLE 42).
const raceScale = 4
