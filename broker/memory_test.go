package broker

import "testing"

// TestStormRelease: memory is returned once after a storm of connects, two
// quiet ticks after it ends (or once the store has written its device
// records, for at most a minute), and never for a small burst or a steady
// trickle of connects, however many add up.
func TestStormRelease(t *testing.T) {
	var r stormRelease
	var n int64
	busy := false
	step := func(add int64) bool { n += add; return r.tick(n, busy) }
	for i := 0; i < 100; i++ { // a trickle of 40 connects per tick: 4,000 in all
		if step(40) {
			t.Fatalf("released during a steady trickle (tick %d)", i)
		}
	}
	// quiet reports whether any of n ticks without connects released.
	quiet := func(n int) bool {
		released := false
		for i := 0; i < n; i++ {
			released = step(0) || released
		}
		return released
	}
	if step(600) || quiet(3) {
		t.Fatal("released after a burst of 600 connects")
	}
	if step(5000) {
		t.Fatal("released during the storm")
	}
	if step(5000) {
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

	// The store still writing the storm's device records: wait for it,
	// up to releaseStoreWaitTicks quiet ticks.
	busy = true
	if step(5000) || quiet(3) {
		t.Fatal("released while the store writes the storm's records")
	}
	busy = false
	if !step(0) {
		t.Fatal("not released once the store caught up")
	}
	busy = true
	step(5000)
	for i := 1; i < releaseStoreWaitTicks; i++ {
		if step(0) {
			t.Fatalf("released after %d quiet ticks with the store busy", i)
		}
	}
	if !step(0) {
		t.Fatal("not released after waiting releaseStoreWaitTicks for a store that stays busy")
	}
}

// TestStormReleaseAfterParking: connections parking count as connects, so
// the release after a connect storm waits until they have parked (their
// goroutine stacks are free only then), and a wave of parked connections
// woken together (a fleet's keep-alive pings) and parked again is
// released too, with no connect at all.
func TestStormReleaseAfterParking(t *testing.T) {
	var r stormRelease
	var connects, parked int64
	step := func(add, nowParked int64) bool {
		connects += add
		parked = nowParked
		r.observe(parked)
		return r.tick(connects, false)
	}
	for i := 0; i < 2; i++ {
		if step(5000, 0) {
			t.Fatal("released during the storm")
		}
	}
	if step(0, 0) {
		t.Fatal("released after one quiet tick")
	}
	// The connections park (5 s idle) at the second quiet tick: that tick
	// is not quiet, the release comes two ticks later.
	if step(0, 10000) {
		t.Fatal("released while the storm's connections were parking")
	}
	if step(0, 10000) {
		t.Fatal("released one quiet tick after the connections parked")
	}
	if !step(0, 10000) {
		t.Fatal("not released two quiet ticks after the connections parked")
	}
	// A keep-alive wave: all wake (unparked), then park again.
	for _, p := range []int64{0, 10000, 10000} {
		if step(0, p) {
			t.Fatal("released before two quiet ticks after the wave")
		}
	}
	if !step(0, 10000) {
		t.Fatal("not released after a wave of 10,000 connections woke and parked again")
	}
	// Connections that wake and park one by one (pings spread over the
	// keep-alive) never add up to a release.
	for i := 0; i < 100; i++ {
		if step(0, 10000-int64(i%2)*40) {
			t.Fatalf("released for a trickle of parks (tick %d)", i)
		}
	}
}

// TestReleaseAfterReconciliation: a reconciliation of the device records
// (after a storm overflowed their queue) releases once it is over and the
// store has no records left to write; once per reconciliation.
func TestReleaseAfterReconciliation(t *testing.T) {
	var r stormRelease
	if r.reconciled(0, false) {
		t.Fatal("released without a reconciliation")
	}
	if r.reconciled(1, true) {
		t.Fatal("released while the store still writes records")
	}
	if !r.reconciled(1, false) {
		t.Fatal("not released after the reconciliation, the store idle")
	}
	if r.reconciled(1, false) {
		t.Fatal("released twice for one reconciliation")
	}
	if !r.reconciled(2, false) {
		t.Fatal("not released after the next reconciliation")
	}
}
