package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// profile runs rtm (one node, production settings) under QoS 0 fan-in,
// QoS 1 fan-in and QoS 0 fan-out, and saves a CPU profile and an
// allocation profile of the broker during each from its admin port
// (/debug/pprof, behind the admin key), with `go tool pprof -top` of each.
func profile(ctx context.Context, o options) error {
	if err := os.MkdirAll(o.profile, 0o755); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "rtm-profile-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	version := gitDescribe()
	bin, err := build(ctx, dir, "rtm", "./cmd/rtm", version)
	if err != nil {
		return err
	}
	s, err := startRTM(ctx, dir, bin, o.brokerCPUs, version)
	if err != nil {
		return err
	}
	defer s.stop()
	dur, window := 20*time.Second, 14
	if o.quick {
		dur, window = 8*time.Second, 5
	}
	for _, sc := range scenarios(o.quick, 0) {
		if o.only == nil && sc.key != "fanin0" && sc.key != "fanin1" && sc.key != "fanout0" {
			continue
		}
		if (o.only != nil && !o.only[sc.key]) || sc.conn {
			continue
		}
		args := append([]string(nil), sc.args...)
		for i, a := range args {
			if a == "--duration" {
				args[i+1] = dur.String()
			}
		}
		argv := benchArgs(bin, scenario{key: sc.key, args: args}, s)
		benchkit.Logf("profiling %s: %s", sc.title, strings.Join(argv[1:], " "))
		var wg sync.WaitGroup
		var out outcome
		wg.Add(1)
		go func() {
			defer wg.Done()
			out = runBench(ctx, o.loadCPUs, argv, filepath.Join(o.profile, sc.key+".bench.log"))
		}()
		// Profile the middle of the run: after connecting, before the drain.
		time.Sleep(2 * time.Second)
		var perr [2]error
		var pw sync.WaitGroup
		for i, kind := range []string{"profile", "allocs"} {
			pw.Add(1)
			go func() {
				defer pw.Done()
				file := filepath.Join(o.profile, fmt.Sprintf("%s.%s.pprof", sc.key, map[string]string{"profile": "cpu", "allocs": "allocs"}[kind]))
				perr[i] = fetchProfile(ctx, s.admin, fmt.Sprintf("/debug/pprof/%s?seconds=%d", kind, window), file)
			}()
		}
		pw.Wait()
		wg.Wait()
		if out.res == nil {
			return fmt.Errorf("%s: %s", sc.key, out.err)
		}
		for _, err := range perr {
			if err != nil {
				return fmt.Errorf("%s: %w", sc.key, err)
			}
		}
		fmt.Printf("## %s: delivered %.0f msg/s, %.0f per broker CPU-second, broker %.2f cores, lost %d\n\n",
			sc.title, out.res.DeliveredRate, perCPU(out), cpuShare(out), out.res.Lost)
		for _, kind := range []struct{ file, index string }{{"cpu", ""}, {"allocs", "alloc_space"}} {
			file := filepath.Join(o.profile, sc.key+"."+kind.file+".pprof")
			args := []string{"tool", "pprof", "-top", "-nodecount=15"}
			if kind.index != "" {
				args = append(args, "-sample_index="+kind.index)
			}
			top, err := exec.CommandContext(ctx, "go", append(args, file)...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("go tool pprof %s: %v: %s", file, err, top)
			}
			txt := filepath.Join(o.profile, sc.key+"."+kind.file+".top.txt")
			if err := os.WriteFile(txt, top, 0o644); err != nil {
				return err
			}
			fmt.Printf("### %s (%s)\n\n```\n%s```\n\n", kind.file, file, top)
		}
	}
	benchkit.Logf("profiles in %s: go tool pprof -http : %s/fanin0.cpu.pprof", o.profile, o.profile)
	return nil
}

func perCPU(o outcome) float64 {
	if o.res.Broker == nil {
		return 0
	}
	return o.res.Broker.MsgsPerCPUs
}

func cpuShare(o outcome) float64 {
	if o.res.Broker == nil {
		return 0
	}
	return o.res.Broker.CPUShare
}

func fetchProfile(ctx context.Context, admin, path, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
