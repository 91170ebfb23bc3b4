package plugins

import (
	"sync"
	"testing"
)

// Ids made by concurrent publishers increase, for each of them, in the
// order it got them: a client's messages sort in the order it sent them.
// ulid.Make failed this (a goroutine that read the clock earlier could draw
// new, lower entropy after another's).
func TestIDsIncreasePerCaller(t *testing.T) {
	g := newIDGen()
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prev := ""
			for range 20000 {
				id := g.next()
				if id <= prev {
					errs <- prev + " then " + id
					return
				}
				prev = id
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal("id went down:", e)
	}
}
