//go:build race

package mochifix_test

// raceEnabled: the race detector instruments every function (larger frames,
// shadow memory), so memory figures measured under it are not the
// production ones.
const raceEnabled = true
