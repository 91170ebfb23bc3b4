package main

import (
	"testing"
	"time"
)

// TestAnalyse: the check that decides the exit status finds every
// acknowledged message a subscriber did not get (grouped into runs of
// consecutive numbers, with the publisher's and subscriber's nodes),
// ignores unacknowledged ones, tells an inversion within one publisher
// connection from one across a reconnect, and counts duplicates.
func TestAnalyse(t *testing.T) {
	p := &publisher{id: 0}
	for seq := uint64(1); seq <= 10; seq++ {
		conn := 1
		if seq > 6 {
			conn = 2
		}
		if seq == 6 {
			continue // no PUBACK: not promised
		}
		p.acked = append(p.acked, ack{seq: seq, at: time.Duration(seq) * time.Second, node: "n1", conn: conn})
	}
	s := newSubscriber(0, false, 0)
	s.conns.l = []span{{Node: "n2", From: 0}}
	// 3 and 4 lost; 6 (unacknowledged) lost too, which is allowed; 5
	// and 2 (connection 1) after 7 (connection 2): across a reconnect; 8
	// after 9, both of connection 2: within one; 9 twice.
	for _, d := range []struct {
		seq  uint64
		conn int
	}{{1, 1}, {7, 2}, {5, 1}, {2, 1}, {9, 2}, {8, 2}, {9, 2}, {10, 2}} {
		s.record(encode(0, d.seq, d.conn))
	}
	ok := newSubscriber(1, true, 0)
	for seq := uint64(1); seq <= 10; seq++ {
		ok.record(encode(0, seq, 1))
	}
	r := analyse([]*publisher{p}, []*subscriber{s, ok}, 1, "", nil)
	if r.Acked != 9 || r.Expected != 18 {
		t.Fatalf("acked %d expected %d, want 9 and 18", r.Acked, r.Expected)
	}
	if r.Lost != 2 || len(r.Losses) != 1 {
		t.Fatalf("lost %d in %d groups, want 2 in 1: %+v", r.Lost, len(r.Losses), r.Losses)
	}
	g := r.Losses[0]
	if g.FirstSeq != 3 || g.LastSeq != 4 || g.Count != 2 || g.PubNode != "n1" || g.SubNode != "n2" || g.Subscriber != s.name {
		t.Fatalf("loss group %+v", g)
	}
	if r.OutOfOrder != 3 || r.OutOfOrderSameConn != 1 {
		t.Fatalf("out of order %d (same connection %d), want 3 (1): %+v", r.OutOfOrder, r.OutOfOrderSameConn, r.Inversions)
	}
	if len(r.Inversions) != 2 || r.Inversions[0].FirstSeq != 5 || r.Inversions[0].LastSeq != 2 || r.Inversions[0].Count != 2 ||
		r.Inversions[0].After != 7 || r.Inversions[0].SameConn || r.Inversions[1].FirstSeq != 8 || !r.Inversions[1].SameConn {
		t.Fatalf("inversions %+v", r.Inversions)
	}
	if r.Duplicates != 1 {
		t.Fatalf("duplicates %d, want 1", r.Duplicates)
	}
	if r.Subscribers[1].Lost != 0 || r.Subscribers[1].OutOfOrder != 0 {
		t.Fatalf("the complete subscriber: %+v", r.Subscribers[1])
	}
}
