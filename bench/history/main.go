// Command history measures message history on the embedded store, each
// figure against a peer measured in the same run, in alternating rounds:
//
//		go run ./bench/history [-rounds 5] [-publish 20000] [-ingest 20000] [-ingest-topics 10,1000] [-page-sizes 100000,1000000] [-pages 200]
//
//	  - capture: QoS 1 publish throughput (16 clients, 64-byte payloads, no
//	    subscriber) of a broker that captures every message into history,
//	    against one that captures none; both in this process, on one
//	    embedded store, run one after the other, the first alternating;
//	    and this process's CPU per message, history's writing included
//	    (steadier on a shared machine). Rounds start after the history
//	    loop's first purge, on a fresh database, and after a round of
//	    each broker that is not counted (the process's warm-up). Each
//	    round's on/off is reported too: the two are measured one after
//	    the other, so a change in the machine's load between rounds
//	    moves it less than the ratio of the medians. -round-stats logs
//	    what each round's history writer and garbage collector did, and
//	    -round-profiles writes a CPU profile of each round.
//	  - insertcost (only when asked): this process's CPU a message for
//	    InsertHistory by batch size, the writer's side of capture.
//	  - ingest: messages per second written to the store through history's
//	    writer (writebehind group commit, InsertHistory) against a loop of
//	    raw InsertMany calls of 256 documents, on a fresh database each run.
//	  - pages: latency of GET /v1/history's query (a page of 50, newest
//	    first, from the first page and from random cursors) on a topic
//	    holding a tenth of the collection, for each collection size, and of
//	    GET /v1/messages/{id}'s; the server's explain of the per-message
//	    query; a sample of the buckets' sizes (embedded store).
//
// It prints Markdown to stdout and progress to stderr.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/oklog/ulid/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

func main() {
	rounds := flag.Int("rounds", 5, "rounds of each comparison")
	publish := flag.Int("publish", 20000, "messages per publish run")
	ingest := flag.Int("ingest", 20000, "messages per ingest run")
	pageSizes := flag.String("page-sizes", "100000,1000000", "collection sizes for the page latency (the topic holds a tenth; 1000000 is issue 14's case)")
	pages := flag.Int("pages", 20, "pages timed per collection size")
	only := flag.String("only", "capture,ingest,pages", "measurements to run (and insertcost: the writer's CPU by batch size)")
	flag.StringVar(&ingestTopicsList, "ingest-topics", "10,1000", "topics of the ingest messages, one measurement per count (on the embedded store the history index writes each topic of a batch into a segment once every 32 batches)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run (store included) to this file")
	memprofile := flag.String("memprofile", "", "write the allocations of the whole run (store included) to this file (pprof allocs: alloc_space shows what fed the garbage collector)")
	flag.StringVar(&insertSizes, "insert-sizes", "100,300,1000,4000", "insertcost: batch sizes (-ingest messages each)")
	flag.IntVar(&historyBatch, "history-batch", 0, "capture: history.batch_size of the capturing broker (0: the default)")
	flag.DurationVar(&historyLinger, "history-linger", -1, "capture: history.batch_linger of the capturing broker (negative: the default)")
	flag.StringVar(&roundProfiles, "round-profiles", "", "capture: write a CPU profile of each round to this directory (round-N-on.pprof, round-N-off.pprof); not with -cpuprofile")
	flag.BoolVar(&roundStats, "round-stats", false, "capture: log each round's history inserts (count, mean batch, latency), garbage collections, heap and queue peaks")
	flag.StringVar(&storeURI, "store-uri", "", "a MongoDB-compatible store to use instead of an embedded one in this process (e.g. `rtm store` pinned to other cores with taskset, as a production store has its own machine); its CPU is then not counted")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "history bench:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(*rounds, *publish, *ingest, *pageSizes, *pages, *only); err != nil {
		fmt.Fprintln(os.Stderr, "history bench:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
	if *memprofile != "" {
		f, err := os.Create(*memprofile)
		if err == nil {
			err = pprof.Lookup("allocs").WriteTo(f, 0)
			_ = f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "history bench:", err)
			os.Exit(1)
		}
	}
}

var (
	roundProfiles    string
	roundStats       bool
	insertSizes      string
	historyBatch     int
	historyLinger    time.Duration
	storeURI         string
	ingestTopicsList = "10,1000"
	ingestTopics     = 1000
)

func run(rounds, publish, ingest int, pageSizes string, pages int, only string) error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "rtm-bench-history-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	uri, where := storeURI, "store at "+storeURI
	if uri == "" {
		benchkit.Logf("starting the embedded store in %s", dir)
		e, err := store.StartEmbedded(ctx, store.EmbeddedOptions{DataDir: dir + "/store"})
		if err != nil {
			return err
		}
		defer e.Close(context.Background())
		uri, where = e.URI(), "embedded store"
	}
	fmt.Printf("## History (%s, %d rounds, medians)\n\n", where, rounds)
	if strings.Contains(only, "capture") {
		if err := benchCapture(ctx, uri, dir, rounds, publish); err != nil {
			return err
		}
	}
	if strings.Contains(only, "insertcost") {
		if err := benchInsertCost(ctx, uri, insertSizes, ingest); err != nil {
			return err
		}
	}
	if strings.Contains(only, "ingest") {
		for _, s := range strings.Split(ingestTopicsList, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || n < 1 {
				return fmt.Errorf("-ingest-topics: %q", s)
			}
			ingestTopics = n
			if err := benchIngest(ctx, uri, rounds, ingest); err != nil {
				return err
			}
		}
	}
	if strings.Contains(only, "pages") {
		for _, s := range strings.Split(pageSizes, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				return err
			}
			if err := benchPages(ctx, uri, n, pages); err != nil {
				return err
			}
		}
	}
	return nil
}

func open(ctx context.Context, uri, db string) (*store.Store, error) {
	return store.Open(ctx, store.Options{URI: uri, Database: db})
}

// cpuTime is the CPU time this process (brokers and embedded store) has
// used: on a shared machine a steadier measure of cost than latency.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// benchCapture: publish throughput with history capture on and off.
func benchCapture(ctx context.Context, uri, dir string, rounds, n int) error {
	// A fresh database: a store kept across runs (one `rtm store` for
	// several runs) would otherwise hold every earlier run's history, which
	// the first purge reads and the writer's chain of the topic continues.
	if err := dropDB(ctx, uri, "bench_capture"); err != nil {
		return err
	}
	st, err := open(ctx, uri, "bench_capture")
	if err != nil {
		return err
	}
	defer func() { _ = st.DB().Drop(context.Background()); _ = st.Close(context.Background()) }()
	regs := map[string]*prometheus.Registry{}
	start := func(name, topics string) (*broker.Broker, error) {
		cfg := config.Defaults().Broker
		cfg.NodeName, cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = name, "127.0.0.1:0", "", "127.0.0.1:0"
		cfg.MaxInflight, cfg.MaxQueued = 65535, 65535
		h := config.Defaults().History
		h.Topics = topics
		if historyBatch > 0 {
			h.BatchSize = historyBatch
		}
		if historyLinger >= 0 {
			h.BatchLinger = historyLinger
		}
		reg := obs.NewRegistry()
		regs[name] = reg
		b, err := broker.New(broker.Options{Config: cfg, Auth: config.Auth{Devices: "anonymous"}, Store: st,
			History: h, DataDir: dir + "/" + name, Logger: obs.Discard(), Version: "bench", Registry: reg})
		if err != nil {
			return nil, err
		}
		return b, b.Start(ctx)
	}
	on, err := start("on", "bench/#")
	if err != nil {
		return err
	}
	defer on.Shutdown(context.Background())
	off, err := start("off", "")
	if err != nil {
		return err
	}
	defer off.Shutdown(context.Background())
	// The history loop's first purge runs 10 s after the start, then once
	// an hour (history.purge_interval): on FerretDB it reads the whole
	// history. In a round it would charge a cost of once an hour to a
	// minute of publishing, so the rounds start after it, on an empty
	// store.
	benchkit.Logf("capture: waiting 11 s for the first history purge")
	time.Sleep(11 * time.Second)
	var rOn, rOff, cOn, cOff []float64
	// measure returns the publish rate and this process's CPU time per
	// message (µs), the history writer's catching up included: on a
	// shared machine the steadier of the two.
	measure := func(b *broker.Broker, round int) (float64, float64, error) {
		var rs *roundStat
		if roundStats {
			rs = startRoundStat(b, regs[b.Name()])
		}
		if roundProfiles != "" {
			f, err := os.Create(fmt.Sprintf("%s/round-%d-%s.pprof", roundProfiles, round, b.Name()))
			if err != nil {
				return 0, 0, err
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				return 0, 0, err
			}
			defer func() { pprof.StopCPUProfile(); _ = f.Close() }()
		}
		cpu0 := cpuTime()
		r, err := publishRate(ctx, b.Addr(broker.ListenerTCP), b.Name(), n)
		if err != nil {
			return 0, 0, err
		}
		rs.published()
		if b == on {
			// The next run starts with history written: its store writes
			// belong to this run.
			wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			for b.Stats().History.Queued > 0 || b.Stats().History.SpoolMessages > 0 {
				select {
				case <-wctx.Done():
					return 0, 0, wctx.Err()
				case <-time.After(20 * time.Millisecond):
				}
			}
		}
		c := float64((cpuTime()-cpu0)/time.Nanosecond) / 1e3 / float64(n)
		rs.report(fmt.Sprintf("round %d %s", round, b.Name()), n)
		return r, c, nil
	}
	// A round of each first, not counted: the first round of a process
	// pays for its heap, pools and goroutine stacks growing to their
	// steady size (more garbage collections: the heap target starts
	// small), and it was always a capturing round.
	for _, b := range []*broker.Broker{on, off} {
		r, c, err := measure(b, 0)
		if err != nil {
			return err
		}
		benchkit.Logf("capture warm-up: %s %.0f msg/s, %.1f µs of CPU a message (not counted)", b.Name(), r, c)
	}
	for i := range rounds {
		order := []*broker.Broker{on, off}
		if i%2 == 1 {
			order = []*broker.Broker{off, on}
		}
		for _, b := range order {
			r, c, err := measure(b, i+1)
			if err != nil {
				return err
			}
			if b == on {
				rOn, cOn = append(rOn, r), append(cOn, c)
			} else {
				rOff, cOff = append(rOff, r), append(cOff, c)
			}
			benchkit.Logf("capture round %d: %s %.0f msg/s, %.1f µs of CPU a message", i+1, b.Name(), r, c)
		}
	}
	h := on.Stats().History
	fmt.Printf("### Publish throughput, capture on vs off\n\n")
	fmt.Printf("QoS 1, 16 publishers, %d messages a run, 64-byte payloads, no subscriber.\n\n", n)
	fmt.Printf("| capture | msg/s (median) | runs | CPU µs a message (median; this process, store and publishers included) | runs |\n| --- | --- | --- | --- | --- |\n")
	fmt.Printf("| on (every message stored) | %.0f | %s | %.1f | %s |\n", median(rOn), fmtRuns(rOn), median(cOn), fmtRunsF(cOn))
	fmt.Printf("| off | %.0f | %s | %.1f | %s |\n\n", median(rOff), fmtRuns(rOff), median(cOff), fmtRunsF(cOff))
	var pairs []float64
	for i := range rOn {
		pairs = append(pairs, rOn[i]/rOff[i])
	}
	fmt.Printf("Ratio on/off: **%.2f** (target ≥ 0.9); by CPU a message, off/on: %.2f; each round's on/off (the two measured one after the other), median %.2f: %s. Captured %d, written %d, dropped %d; failed inserts %d (each moves what memory holds to the spool). Load average: %s.\n\n",
		median(rOn)/median(rOff), median(cOff)/median(cOn), median(pairs), fmtRuns2(pairs), h.Captured, h.Written, h.Dropped, h.Failures, benchkit.Loadavg())
	return nil
}

func fmtRunsF(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%.1f", x))
	}
	return strings.Join(s, ", ")
}

func fmtRuns2(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%.2f", x))
	}
	return strings.Join(s, ", ")
}

// dropDB drops a database of the store at uri.
func dropDB(ctx context.Context, uri, db string) error {
	st, err := open(ctx, uri, db)
	if err != nil {
		return err
	}
	defer st.Close(ctx)
	return st.DB().Drop(ctx)
}

func fmtRuns(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%.0f", x))
	}
	return strings.Join(s, ", ")
}

// publishRate publishes n QoS 1 messages from 16 clients (each keeping up
// to 64 in flight) and returns messages per second.
func publishRate(ctx context.Context, addr, tag string, n int) (float64, error) {
	const clients, window = 16, 64
	var cs []*paho.Client
	for i := range clients {
		c, _, err := benchkit.Dial(ctx, addr, benchkit.Options{ID: fmt.Sprintf("%s-%d-%d", tag, i, rand.Uint32()), ReceiveMax: 16})
		if err != nil {
			return 0, err
		}
		cs = append(cs, c)
	}
	defer func() {
		for _, c := range cs {
			benchkit.HangUp(c)
		}
	}()
	payload := make([]byte, 64)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	t0 := time.Now()
	for _, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem := make(chan struct{}, window)
			var inner sync.WaitGroup
			for range n / clients {
				sem <- struct{}{}
				inner.Add(1)
				go func() {
					defer inner.Done()
					defer func() { <-sem }()
					pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					defer cancel()
					if _, err := c.Publish(pctx, &paho.Publish{Topic: "bench/t", QoS: 1, Payload: payload}); err != nil {
						select {
						case errs <- err:
						default:
						}
					}
				}()
			}
			inner.Wait()
		}()
	}
	wg.Wait()
	el := time.Since(t0)
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(n/clients*clients) / el.Seconds(), nil
}

func histMsgs(n int, topic func(i int) string) []store.HistoryMessage {
	out := make([]store.HistoryMessage, n)
	now := time.Now().UTC().Truncate(time.Millisecond)
	payload := make([]byte, 64)
	for i := range out {
		out[i] = store.HistoryMessage{ID: ulid.Make().String(), Topic: topic(i), Payload: payload, QoS: 1,
			Publisher: "bench", Node: "b0", Time: now}
	}
	return out
}

// benchIngest: history's writer against a raw InsertMany loop.
func benchIngest(ctx context.Context, uri string, rounds, n int) error {
	topic := func(i int) string { return fmt.Sprintf("devices/d%d/inbox", i%ingestTopics) }
	raw := func(run int) (float64, error) {
		st, err := open(ctx, uri, fmt.Sprintf("bench_raw_%d", run))
		if err != nil {
			return 0, err
		}
		defer func() { _ = st.DB().Drop(ctx); _ = st.Close(ctx) }()
		msgs := histMsgs(n, topic)
		coll := st.DB().Collection(store.CollHistory)
		t0 := time.Now()
		for i := 0; i < n; i += 256 {
			docs := make([]any, 0, 256)
			for j := i; j < min(i+256, n); j++ {
				docs = append(docs, &msgs[j])
			}
			if _, err := coll.InsertMany(ctx, docs, options.InsertMany().SetOrdered(false)); err != nil {
				return 0, err
			}
		}
		return float64(n) / time.Since(t0).Seconds(), nil
	}
	writer := func(run int) (float64, error) {
		st, err := open(ctx, uri, fmt.Sprintf("bench_writer_%d", run))
		if err != nil {
			return 0, err
		}
		defer func() { _ = st.DB().Drop(ctx); _ = st.Close(ctx) }()
		msgs := histMsgs(n, topic)
		h := config.Defaults().History
		w, err := writebehind.New(writebehind.Options[store.HistoryMessage]{Name: "history", Write: st.InsertHistory,
			MaxBatch: h.BatchSize, Linger: h.BatchLinger, QueueLen: n})
		if err != nil {
			return 0, err
		}
		defer w.Close(ctx)
		t0 := time.Now()
		for _, m := range msgs {
			if err := w.Add(m); err != nil {
				return 0, err
			}
		}
		if err := w.Flush(ctx); err != nil {
			return 0, err
		}
		return float64(n) / time.Since(t0).Seconds(), nil
	}
	var rRaw, rW []float64
	for i := range rounds {
		type runner struct {
			f   func(int) (float64, error)
			out *[]float64
		}
		rs := []runner{{raw, &rRaw}, {writer, &rW}}
		if i%2 == 1 {
			rs[0], rs[1] = rs[1], rs[0]
		}
		for _, r := range rs {
			v, err := r.f(i)
			if err != nil {
				return err
			}
			*r.out = append(*r.out, v)
		}
		benchkit.Logf("ingest round %d: raw %.0f, writer %.0f msg/s", i+1, rRaw[len(rRaw)-1], rW[len(rW)-1])
	}
	fmt.Printf("### History ingest: the writer vs raw InsertMany, %d topics\n\n", ingestTopics)
	fmt.Printf("%d messages a run (64-byte payloads, %d topics), a fresh database each run with history's indexes.\n\n", n, ingestTopics)
	fmt.Printf("| writer | msg/s (median) | runs |\n| --- | --- | --- |\n")
	fmt.Printf("| history (writebehind, batches of %d) | %.0f | %s |\n", config.Defaults().History.BatchSize, median(rW), fmtRuns(rW))
	fmt.Printf("| raw InsertMany loop, 256 a call | %.0f | %s |\n\n", median(rRaw), fmtRuns(rRaw))
	fmt.Printf("Ratio writer/raw: **%.2f** (target ≥ 0.8).\n\n", median(rW)/median(rRaw))
	return nil
}

// benchPages: page latency on a topic holding a tenth of the collection.
func benchPages(ctx context.Context, uri string, total, pages int) error {
	st, err := open(ctx, uri, fmt.Sprintf("bench_pages_%d", total))
	if err != nil {
		return err
	}
	defer func() { _ = st.DB().Drop(ctx); _ = st.Close(ctx) }()
	benchkit.Logf("pages: loading %d messages", total)
	t0 := time.Now()
	var ids []string // of the topic, oldest first
	// Batches as history's writer makes them under load: the size decides
	// how many ids an index segment holds on the embedded store.
	batch := config.Defaults().History.BatchSize
	for i := 0; i < total; i += batch {
		msgs := histMsgs(min(batch, total-i), func(j int) string {
			if (i+j)%10 == 0 {
				return "push/hot"
			}
			return fmt.Sprintf("push/c%d", (i+j)%97)
		})
		for _, m := range msgs {
			if m.Topic == "push/hot" {
				ids = append(ids, m.ID)
			}
		}
		if err := st.InsertHistory(ctx, msgs); err != nil {
			return err
		}
	}
	load := time.Since(t0)
	// A sample of the buckets (embedded store): their size decides what a
	// page reads.
	var sample []struct {
		Count int    `bson:"m"`
		Data  []byte `bson:"d"`
	}
	if cur, err := st.DB().Collection(store.CollHistoryIndex).Find(ctx, bson.D{{Key: "d", Value: bson.D{{Key: "$exists", Value: true}}}},
		options.Find().SetLimit(50)); err == nil {
		_ = cur.All(ctx, &sample)
	}
	var bMsgs, bBytes int
	for _, b := range sample {
		bMsgs, bBytes = bMsgs+b.Count, bBytes+len(b.Data)
	}
	var lats []time.Duration
	cpu0 := cpuTime()
	for i := range pages {
		q := store.HistoryQuery{Topic: "push/hot", Limit: 50}
		if i > 0 {
			q.Before = ids[rand.IntN(len(ids))]
		}
		s := time.Now()
		got, err := st.History(ctx, q)
		if err != nil {
			return err
		}
		lats = append(lats, time.Since(s))
		if len(got) == 0 {
			return fmt.Errorf("empty page")
		}
	}
	cpuPerPage := (cpuTime() - cpu0) / time.Duration(pages)
	slices.Sort(lats)
	// GET /v1/messages/{id}'s query, on random ids of the topic: on the
	// embedded store a search of the writer's log, then the bucket.
	var byID []time.Duration
	cpu0 = cpuTime()
	for range pages {
		id := ids[rand.IntN(len(ids))]
		s := time.Now()
		m, err := st.HistoryByID(ctx, id)
		if err != nil {
			return fmt.Errorf("message %s by id: %w", id, err)
		}
		byID = append(byID, time.Since(s))
		if m.ID != id {
			return fmt.Errorf("message %s by id: got %s", id, m.ID)
		}
	}
	cpuPerID := (cpuTime() - cpu0) / time.Duration(pages)
	slices.Sort(byID)
	var explain bson.M
	_ = st.DB().RunCommand(ctx, bson.D{{Key: "explain", Value: bson.D{{Key: "find", Value: store.CollHistory},
		{Key: "filter", Value: store.HistoryFilter(store.HistoryQuery{Topic: "push/hot", Before: ids[len(ids)/2]})},
		{Key: "sort", Value: bson.D{{Key: "_id", Value: -1}}}, {Key: "limit", Value: 50}}}}).Decode(&explain)
	plan := fmt.Sprintf("filterPushdown=%v sortPushdown=%v", explain["filterPushdown"], explain["sortPushdown"])
	if qp, ok := explain["queryPlanner"].(bson.M); ok {
		if wp, ok := qp["winningPlan"]; ok {
			plan = fmt.Sprint(wp)
		}
	}
	fmt.Printf("### Page latency: %d messages, the topic holds %d\n\n", total, len(ids))
	fmt.Printf("A page of 50, newest first; the first page, then %d pages from random cursors. Loaded in batches of %d, in %v.\n\n", pages-1, batch, load.Round(time.Millisecond))
	fmt.Printf("| p50 | p99 | max | CPU a page (this process, the store included) |\n| --- | --- | --- | --- |\n| %v | %v | %v | %v |\n\n",
		lats[len(lats)/2].Round(time.Millisecond), lats[len(lats)*99/100].Round(time.Millisecond), lats[len(lats)-1].Round(time.Millisecond),
		cpuPerPage.Round(100*time.Microsecond))
	fmt.Printf("A message by id (%d random ids of the topic): p50 %v, p99 %v, max %v; %v of CPU a lookup.\n\n", pages,
		byID[len(byID)/2].Round(100*time.Microsecond), byID[len(byID)*99/100].Round(100*time.Microsecond),
		byID[len(byID)-1].Round(100*time.Microsecond), cpuPerID.Round(100*time.Microsecond))
	fmt.Printf("Server's explain (of the per-message layout's query): `%s`.\n\n", plan)
	if len(sample) > 0 && bMsgs > 0 {
		fmt.Printf("Buckets (a sample of %d): %d messages and %.1f KiB each on average, %d bytes a message.\n\n",
			len(sample), bMsgs/len(sample), float64(bBytes)/float64(len(sample))/1024, bBytes/bMsgs)
	}
	return nil
}

// benchInsertCost: the writer's side of an insert, by batch size: this
// process's CPU a message for InsertHistory of batches of one node's
// messages on one topic (history capture's shape), the store excluded
// when it runs in its own process (-store-uri). It separates what an
// insert costs whatever its size from what each message costs.
func benchInsertCost(ctx context.Context, uri string, sizes string, total int) error {
	fmt.Printf("### The writer's CPU a message, by batch size\n\n")
	fmt.Printf("InsertHistory of %d messages (64-byte payloads, one topic) in batches of each size; this process's CPU (the store's too when embedded).\n\n", total)
	fmt.Printf("| batch | CPU µs a message | CPU µs a batch | wall ms a batch |\n| --- | --- | --- | --- |\n")
	for _, f := range strings.Split(sizes, ",") {
		size, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || size < 1 {
			return fmt.Errorf("-insert-sizes: %q", f)
		}
		db := fmt.Sprintf("bench_insert_%d", size)
		if err := dropDB(ctx, uri, db); err != nil {
			return err
		}
		st, err := open(ctx, uri, db)
		if err != nil {
			return err
		}
		msgs := histMsgs(total, func(int) string { return "bench/t" })
		for i := range msgs {
			msgs[i].Node, msgs[i].Publisher = "on", fmt.Sprintf("on-%d-1234567890", i%16)
		}
		// A first batch creates the collections; not counted.
		if err := st.InsertHistory(ctx, histMsgs(size, func(int) string { return "bench/t" })); err != nil {
			return err
		}
		batches := 0
		cpu0, t0 := cpuTime(), time.Now()
		for i := 0; i < total; i += size {
			if err := st.InsertHistory(ctx, msgs[i:min(i+size, total)]); err != nil {
				return err
			}
			batches++
		}
		cpu, wall := cpuTime()-cpu0, time.Since(t0)
		_ = st.DB().Drop(ctx)
		_ = st.Close(ctx)
		fmt.Printf("| %d | %.2f | %.0f | %.1f |\n", size, float64(cpu.Nanoseconds())/1e3/float64(total),
			float64(cpu.Nanoseconds())/1e3/float64(batches), float64(wall.Microseconds())/1e3/float64(batches))
		benchkit.Logf("insert cost: batch %d done", size)
	}
	fmt.Println()
	return nil
}
