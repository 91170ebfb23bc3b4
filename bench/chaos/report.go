package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

type pubRow struct {
	Name  string `json:"name"`
	Sent  int64  `json:"sent"`
	Acked int64  `json:"acked"`
	// Unacked: publishes that ended without a PUBACK (connection lost,
	// refused, timed out): not counted anywhere else.
	Unacked int64  `json:"unacked"`
	Conns   []span `json:"connections"`
}

type subRow struct {
	Name       string `json:"name"`
	Slow       bool   `json:"slow"`
	Delivered  int64  `json:"delivered"`
	Lost       int    `json:"lost"`
	OutOfOrder int    `json:"out_of_order"`
	// OutOfOrderSameConn: inversions between two messages of one
	// connection of their publisher (the others crossed a reconnect of
	// the publisher, whose order MQTT does not promise).
	OutOfOrderSameConn int    `json:"out_of_order_same_publisher_connection"`
	Duplicates         int    `json:"duplicates"`
	NoSession          int64  `json:"reconnects_without_session"`
	FailedConnects     int64  `json:"failed_connects"`
	Conns              []span `json:"connections"`
}

// lossGroup is a run of consecutive acknowledged messages of one publisher
// that one subscriber did not get.
type lossGroup struct {
	Publisher  string        `json:"publisher"`
	Subscriber string        `json:"subscriber"`
	FirstSeq   uint64        `json:"first_seq"`
	LastSeq    uint64        `json:"last_seq"`
	Count      int           `json:"count"`
	AckedFrom  time.Duration `json:"acked_from_ns"`
	AckedTo    time.Duration `json:"acked_to_ns"`
	PubNode    string        `json:"publisher_node"`
	SubNode    string        `json:"subscriber_node"` // where the subscriber was when the first was acknowledged
	Timeline   []event       `json:"timeline"`        // faults from 10 s before to 3 s after
}

// inversion is a run of first deliveries of one publisher's acknowledged
// messages to one subscriber that came after a higher number (After).
type inversion struct {
	Publisher  string        `json:"publisher"`
	Subscriber string        `json:"subscriber"`
	FirstSeq   uint64        `json:"first_seq"`
	LastSeq    uint64        `json:"last_seq"`
	Count      int           `json:"count"`
	After      uint64        `json:"after"`
	SameConn   bool          `json:"same_publisher_connection"`
	From       time.Duration `json:"delivered_from_ns"`
	To         time.Duration `json:"delivered_to_ns"`
	SubNode    string        `json:"subscriber_node"` // where the subscriber was when the first came
	// AfterAt and AfterNode: when After came, and where the subscriber
	// was then (a node cut off that still serves a stale connection
	// delivers there what its adopted session gets later).
	AfterAt   time.Duration `json:"after_delivered_ns"`
	AfterNode string        `json:"after_node"`
	Timeline  []event       `json:"timeline"` // faults from 10 s before to 3 s after
}

type result struct {
	Seed       uint64  `json:"seed"`
	Brokers    int     `json:"brokers"`
	Duration   string  `json:"duration"`
	FaultMode  string  `json:"fault_mode"`
	Faults     int     `json:"faults"`
	Router     bool    `json:"router"`
	Rate       float64 `json:"rate_per_publisher"`
	Sent       int64   `json:"sent"`
	Acked      int64   `json:"acked"`
	Expected   int64   `json:"expected_deliveries"` // acked × subscribers
	Delivered  int64   `json:"delivered"`
	Lost       int     `json:"lost"`
	OutOfOrder int     `json:"out_of_order"`
	// OutOfOrderSameConn as in subRow, summed.
	OutOfOrderSameConn int                           `json:"out_of_order_same_publisher_connection"`
	Duplicates         int                           `json:"duplicates"`
	NoSession          int64                         `json:"reconnects_without_session"`
	Settled            string                        `json:"settled"`
	NotSettled         bool                          `json:"not_settled"`
	Loadavg            string                        `json:"loadavg"`
	LogDir             string                        `json:"log_dir"`
	Dropped            map[string]map[string]float64 `json:"dropped_by_node"`
	Publishers         []pubRow                      `json:"publishers"`
	Subscribers        []subRow                      `json:"subscribers"`
	Losses             []lossGroup                   `json:"losses"`
	Inversions         []inversion                   `json:"inversions"`
	Timeline           []event                       `json:"timeline"`
}

func pubName(id int) string { return fmt.Sprintf("chaos-pub-%d", id) }

func analyse(ps []*publisher, all []*subscriber, seed uint64, logDir string, drops map[string]map[string]float64) *result {
	evMu.Lock()
	tl := slices.Clone(events)
	evMu.Unlock()
	r := &result{Seed: seed, Brokers: *brokers, Duration: duration.String(), FaultMode: *faults, Router: *useRouter,
		Rate: *rate, Loadavg: benchkit.Loadavg(), LogDir: logDir, Dropped: drops, Timeline: tl}
	acked := map[int][]ack{}
	ackedSet := map[int]map[uint64]bool{}
	for _, p := range ps {
		p.mu.Lock()
		a := slices.Clone(p.acked)
		p.mu.Unlock()
		slices.SortFunc(a, func(x, y ack) int { return int(x.seq) - int(y.seq) })
		acked[p.id] = a
		ackedSet[p.id] = map[uint64]bool{}
		for _, x := range a {
			ackedSet[p.id][x.seq] = true
		}
		p.conns.mu.Lock()
		conns := slices.Clone(p.conns.l)
		p.conns.mu.Unlock()
		r.Publishers = append(r.Publishers, pubRow{Name: pubName(p.id), Sent: p.sent.Load(), Acked: int64(len(a)),
			Unacked: p.fails.Load(), Conns: conns})
		r.Sent += p.sent.Load()
		r.Acked += int64(len(a))
	}
	r.Expected = r.Acked * int64(len(all))
	for _, s := range all {
		s.mu.Lock()
		row := subRow{Name: s.name, Slow: s.slow > 0, Delivered: s.delivered.Load(), NoSession: s.noSession.Load(), FailedConnects: s.failed.Load()}
		for _, n := range s.got {
			row.Duplicates += n - 1
		}
		for _, p := range ps {
			var g *lossGroup
			for i, a := range acked[p.id] {
				if s.got[[2]uint64{uint64(p.id), a.seq}] > 0 {
					g = nil
					continue
				}
				row.Lost++
				if g != nil && acked[p.id][i-1].seq == g.LastSeq {
					g.LastSeq, g.AckedTo = a.seq, a.at
					g.Count++
					r.Losses[len(r.Losses)-1] = *g
					continue
				}
				g = &lossGroup{Publisher: pubName(p.id), Subscriber: s.name, FirstSeq: a.seq, LastSeq: a.seq, Count: 1,
					AckedFrom: a.at, AckedTo: a.at, PubNode: a.node, SubNode: s.conns.at(a.at)}
				r.Losses = append(r.Losses, *g)
			}
			var maxSeq uint64
			maxConn, maxIdx := 0, 0
			var inv *inversion
			for i, seq := range s.first[p.id] {
				if !ackedSet[p.id][seq] {
					continue
				}
				conn := s.fconn[p.id][i]
				if seq < maxSeq {
					row.OutOfOrder++
					same := conn == maxConn
					if same {
						row.OutOfOrderSameConn++
					}
					if v := inv; v != nil && v.After == maxSeq && v.SameConn == same {
						v.LastSeq, v.To = seq, s.fat[p.id][i]
						v.Count++
						r.Inversions[len(r.Inversions)-1] = *v
						continue
					}
					inv = &inversion{Publisher: pubName(p.id), Subscriber: s.name, FirstSeq: seq, LastSeq: seq, Count: 1, After: maxSeq,
						SameConn: same, From: s.fat[p.id][i], To: s.fat[p.id][i], SubNode: s.fnode[p.id][i],
						AfterAt: s.fat[p.id][maxIdx], AfterNode: s.fnode[p.id][maxIdx]}
					r.Inversions = append(r.Inversions, *inv)
					continue
				}
				maxSeq, maxConn, maxIdx, inv = seq, conn, i, nil
			}
		}
		s.mu.Unlock()
		s.conns.mu.Lock()
		row.Conns = slices.Clone(s.conns.l)
		s.conns.mu.Unlock()
		r.Subscribers = append(r.Subscribers, row)
		r.Delivered += row.Delivered
		r.Lost += row.Lost
		r.OutOfOrder += row.OutOfOrder
		r.OutOfOrderSameConn += row.OutOfOrderSameConn
		r.Duplicates += row.Duplicates
		r.NoSession += row.NoSession
	}
	around := func(from, to time.Duration) []event {
		var out []event
		for _, e := range tl {
			if e.At >= from-10*time.Second && e.At <= to+3*time.Second {
				out = append(out, e)
			}
		}
		return out
	}
	for i := range r.Losses {
		r.Losses[i].Timeline = around(r.Losses[i].AckedFrom, r.Losses[i].AckedTo)
	}
	for i := range r.Inversions {
		r.Inversions[i].Timeline = around(r.Inversions[i].From, r.Inversions[i].To)
	}
	return r
}

func (r *result) print(w io.Writer) {
	fmt.Fprintf(w, "\nchaos: %d brokers, %d publishers x %.0f msg/s QoS 1 (window %d), %d subscribers (%d slow), faults %s every %s (down %s), %s, router %v, seed %d\n",
		r.Brokers, len(r.Publishers), r.Rate, *window, len(r.Subscribers), *slowSubs, r.FaultMode, *interval, *down, r.Duration, r.Router, r.Seed)
	fmt.Fprintf(w, "load average %s; logs in %s\n\n", r.Loadavg, r.LogDir)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "publisher\tsent\tacked\tunacked\tconnections\t")
	for _, p := range r.Publishers {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t\n", p.Name, p.Sent, p.Acked, p.Unacked, len(p.Conns))
	}
	_ = tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "subscriber\tdelivered\tLOST\tOUT OF ORDER (same pub conn)\tduplicates\tconnections\tno session\tfailed connects\t")
	for _, s := range r.Subscribers {
		name := s.Name
		if s.Slow {
			name += " (slow)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d (%d)\t%d\t%d\t%d\t%d\t\n", name, s.Delivered, s.Lost, s.OutOfOrder, s.OutOfOrderSameConn,
			s.Duplicates, len(s.Conns), s.NoSession, s.FailedConnects)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\nfaults %d; sent %d, acknowledged %d, expected deliveries %d (acked x subscribers), delivered %d\n",
		r.Faults, r.Sent, r.Acked, r.Expected, r.Delivered)
	fmt.Fprintf(w, "LOST %d, OUT OF ORDER %d (%d within one publisher connection), duplicates %d, reconnects without session %d\n",
		r.Lost, r.OutOfOrder, r.OutOfOrderSameConn, r.Duplicates, r.NoSession)
	fmt.Fprintf(w, "settled: %s\n", r.Settled)
	var drops []string
	for n, m := range r.Dropped {
		for reason, v := range m {
			drops = append(drops, fmt.Sprintf("%s %s=%.0f", n, reason, v))
		}
	}
	slices.Sort(drops)
	if len(drops) > 0 {
		fmt.Fprintf(w, "rtm_broker_messages_dropped_total of the processes alive at the end: %s\n", strings.Join(drops, ", "))
	}
	for i, g := range r.Losses {
		if i == 30 {
			fmt.Fprintf(w, "... %d more loss groups (all in -json)\n", len(r.Losses)-30)
			break
		}
		fmt.Fprintf(w, "\nLOST %d: %s seq %d..%d acked at %.2fs..%.2fs (%s UTC) by %s, to %s (on %s then)\n", g.Count, g.Publisher, g.FirstSeq, g.LastSeq,
			g.AckedFrom.Seconds(), g.AckedTo.Seconds(), epoch.Add(g.AckedFrom).UTC().Format("15:04:05.000"), g.PubNode, g.Subscriber, g.SubNode)
		for _, e := range g.Timeline {
			fmt.Fprintf(w, "    %7.2fs (%s UTC) %s\n", e.At.Seconds(), e.Wall, e.What)
		}
	}
	for i, v := range r.Inversions {
		if i == 20 {
			fmt.Fprintf(w, "... %d more out-of-order groups (all in -json)\n", len(r.Inversions)-20)
			break
		}
		fmt.Fprintf(w, "\nOUT OF ORDER %d: %s got %s seq %d..%d after %d, at %.2fs..%.2fs (%s UTC), on %s (same publisher connection: %v); %d came at %.2fs (%s UTC) on %s\n",
			v.Count, v.Subscriber, v.Publisher, v.FirstSeq, v.LastSeq, v.After, v.From.Seconds(), v.To.Seconds(),
			epoch.Add(v.From).UTC().Format("15:04:05.000"), v.SubNode, v.SameConn,
			v.After, v.AfterAt.Seconds(), epoch.Add(v.AfterAt).UTC().Format("15:04:05.000"), v.AfterNode)
		for _, e := range v.Timeline {
			fmt.Fprintf(w, "    %7.2fs (%s UTC) %s\n", e.At.Seconds(), e.Wall, e.What)
		}
	}
	verdict := "PASS: every acknowledged message reached every subscriber"
	switch {
	case r.Lost > 0 && r.NotSettled:
		verdict = fmt.Sprintf("INCONCLUSIVE: %d acknowledged deliveries missing, but deliveries were still coming when -settle ran out (a backlog: lower -rate or -slow-delay, or raise -settle)", r.Lost)
	case r.Lost > 0:
		verdict = fmt.Sprintf("FAIL: %d acknowledged deliveries lost", r.Lost)
	}
	fmt.Fprintf(w, "\n%s\n", verdict)
}
