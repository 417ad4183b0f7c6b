// Command bench is ferry's benchmark harness (`make bench`). It builds
// testbed pods around a real Consul agent and measures, in one run and
// interleaved, a direct connection, ferry (plain passthrough and the mTLS
// sidecar pair), Consul's built-in proxy pair and an HAProxy TLS pair, then
// writes a Markdown report with PNG charts.
//
//	go run ./test/bench [-quick] [-out bench/results]
//
// The same binary is the load generator and the server inside the pods
// (`bench load ...`, `bench server ...`, `bench probe ...`).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "server":
			return serverMain(args[1:])
		case "load":
			return loadMain(args[1:])
		case "probe":
			return probeMain(args[1:])
		case "tlsmodes":
			return tlsModesMain(args[1:])
		}
	}
	return harnessMain(args)
}

// params sizes one run; quick mode trades precision for a < 2 min run.
type params struct {
	Mode       string
	Pinned     bool
	Reps       int
	BulkBytes  int64 // single connection
	Bulk64     int64 // total over 64 connections
	RRRate     int
	RRConns    int
	RRDur      time.Duration
	CRRWorkers int
	CRRDur     time.Duration
	IdleConns  int
	// Scenarios limits the run to these (for profiling one scenario);
	// empty runs all.
	Scenarios []string
	// FerryB is a second ferry binary (-ferry-b): the run adds the paths
	// "ferry passthrough (B)" and "ferry mTLS pair (B)" built with it.
	FerryB string `json:",omitempty"`
}

func (p params) runs(scen string) bool {
	return len(p.Scenarios) == 0 || slices.Contains(p.Scenarios, scen)
}

var allScenarios = []string{sBulk1, sBulk64, sRR, sCRR, sIdle}

func paramsFor(quick bool) params {
	if quick {
		return params{Mode: "quick", Reps: 2, BulkBytes: 256 << 20, Bulk64: 256 << 20,
			RRRate: 1000, RRConns: 4, RRDur: 1500 * time.Millisecond,
			CRRWorkers: 8, CRRDur: 1500 * time.Millisecond, IdleConns: 1000}
	}
	return params{Mode: "full", Reps: 5, BulkBytes: 1 << 30, Bulk64: 1 << 30,
		RRRate: 1000, RRConns: 4, RRDur: 5 * time.Second,
		CRRWorkers: 8, CRRDur: 4 * time.Second, IdleConns: maxIdle}
}

// maxIdle is the idle-scenario size: as close to 10,000 as the machine's
// RLIMIT_NOFILE hard limit (20,000, and no CAP_SYS_RESOURCE to raise it)
// allows, since a client-side proxy holds two fds per connection.
const maxIdle = 9500

func harnessMain(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "quick mode: fewer, shorter repetitions (< 2 minutes)")
	out := fs.String("out", "bench/results", "directory for the report and charts")
	reps := fs.Int("reps", 0, "repetitions (default: 2 quick, 5 full)")
	idle := fs.Int("idle", 0, "idle connections for the RSS scenario (default: 1000 quick, 9500 full)")
	only := fs.String("paths", "", "comma-separated path ids to run (default: all, and "+pFerryKTLS+" where the kernel has kernel TLS): "+strings.Join(append(slices.Clone(allPathIDs), pFerryKTLS), ","))
	tag := fs.String("tag", "", "suffix for the report name (e.g. before/after a change)")
	pin := fs.Bool("pin", false, "pin every proxy to CPU 1 with one thread (GOMAXPROCS=1, nbthread 1), load generator and servers to CPU 0")
	scens := fs.String("scenarios", "", "comma-separated scenarios to run (default: all): "+strings.Join(allScenarios, ","))
	ferryB := fs.String("ferry-b", "", "a second ferry binary (e.g. built from an older commit): adds the paths "+pFerryPTB+" and "+pFerryMTLSB+", interleaved with the rest, for before/after comparisons")
	from := fs.String("from", "", "re-render the report and charts of a saved run (its .json) without measuring")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: go run ./test/bench [flags]   (needs root: it builds network namespaces)\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *from != "" {
		return rerender(*from)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: the testbed creates network namespaces, veths and iptables rules")
	}
	p := paramsFor(*quick)
	p.Pinned = *pin
	if *reps > 0 {
		p.Reps = min(*reps, 20)
	}
	if *idle > 0 {
		p.IdleConns = min(*idle, maxIdle)
	}
	if *scens != "" {
		for _, sc := range strings.Split(*scens, ",") {
			sc = strings.TrimSpace(sc)
			if !slices.Contains(allScenarios, sc) {
				return fmt.Errorf("-scenarios: unknown scenario %q (known: %s)", sc, strings.Join(allScenarios, ","))
			}
			p.Scenarios = append(p.Scenarios, sc)
		}
	}
	var ids []string
	if *ferryB != "" {
		abs, err := filepath.Abs(*ferryB)
		if err != nil {
			return fmt.Errorf("-ferry-b: %w", err)
		}
		if fi, err := os.Stat(abs); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return fmt.Errorf("-ferry-b: %s is not an executable file", *ferryB)
		}
		p.FerryB = abs
	}
	if *only != "" {
		for _, id := range strings.Split(*only, ",") {
			id = strings.TrimSpace(id)
			if (id == pFerryPTB || id == pFerryMTLSB) && p.FerryB == "" {
				return fmt.Errorf("-paths: %s needs -ferry-b", id)
			}
			if !knownPath(id) {
				return fmt.Errorf("-paths: unknown path %q (known: %s)", id, strings.Join(allPathIDs, ","))
			}
			ids = append(ids, id)
		}
	} else {
		ids = allPathIDs
		if ktlsByDefault() {
			ids = append(slices.Clone(ids), pFerryKTLS)
		}
		if p.FerryB != "" {
			ids = append(slices.Clone(ids), pFerryPTB, pFerryMTLSB)
		}
	}
	return runHarness(p, ids, *out, *tag)
}
