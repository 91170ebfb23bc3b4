package broker

import "testing"

// TestStormRelease: memory is returned once after a storm of connects, two
// quiet ticks after it ends, and never for a small burst or a steady
// trickle of connects, however many add up.
func TestStormRelease(t *testing.T) {
	var r stormRelease
	var n int64
	step := func(add int64) bool { n += add; return r.tick(n) }
	for i := 0; i < 100; i++ { // a trickle of 40 connects per tick: 4,000 in all
		if step(40) {
			t.Fatalf("released during a steady trickle (tick %d)", i)
		}
	}
	if step(600) || step(0) || step(0) || step(0) {
		t.Fatal("released after a burst of 600 connects")
	}
	if step(5000) || step(5000) {
		t.Fatal("released during the storm")
	}
	if step(10) {
		t.Fatal("released after one quiet tick")
	}
	if !step(0) {
		t.Fatal("not released two quiet ticks after a storm of 10,000 connects")
	}
	for i := 0; i < 10; i++ {
		if step(0) {
			t.Fatal("released again without a new storm")
		}
	}
}
