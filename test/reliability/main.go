// Command reliability is ferry's reliability suite (`make reliability`): on
// the testbed, against a real ferry sidecar pair, it holds thousands of
// connections, churns the mesh under a steady verified load, exhausts fds
// and memory, feeds bad input to every port, kills and stops sidecars, and
// writes a report with per-scenario counts, the sidecars' RSS and fds, and a
// timeline chart. Every app byte is verified end to end (see traffic.go).
//
//	go run ./test/reliability [-quick] [-soak 30m] [-out reliability/results]
//
// It exits non-zero when a scenario fails: a lost or corrupted byte, a
// silently truncated stream, a leaked fd, a crashed sidecar. The same binary
// is the echo server, load client and hostile client in the pods.
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

	"github.com/ferrymesh/ferry/test/testbed"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "reliability:", err)
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
		case "hostile":
			return hostileMain(args[1:])
		}
	}
	return harnessMain(args)
}

// params sizes a run.
type params struct {
	Mode        string
	Conns       int
	Idle        time.Duration
	Churn       time.Duration
	Gap         time.Duration // between churn faults
	Repeat      bool          // cycle the churn faults (soak)
	FDLimit     int
	FDConns     int
	Slowloris   int
	SlowReaders int
	Hold        time.Duration
	Hostile     int
	Soak        time.Duration
	Sample      time.Duration
	Scenarios   []string
}

const (
	sConcurrency = "concurrency"
	sChurn       = "churn"
	sExhaustion  = "exhaustion"
	sHostile     = "hostile"
	sFaults      = "faults"
	sSoak        = "soak"
)

var allScenarios = []string{sConcurrency, sChurn, sExhaustion, sHostile, sFaults}

func paramsFor(quick bool) params {
	if quick {
		return params{Mode: "quick", Conns: 1000, Idle: 2 * time.Second, Churn: 60 * time.Second, Gap: 6 * time.Second,
			FDLimit: 256, FDConns: 300, Slowloris: 300, SlowReaders: 20, Hold: 4 * time.Second, Hostile: 60, Sample: time.Second}
	}
	return params{Mode: "full", Conns: 9500, Idle: 30 * time.Second, Churn: 4 * time.Minute, Gap: 15 * time.Second,
		FDLimit: 512, FDConns: 1000, Slowloris: 3000, SlowReaders: 200, Hold: 15 * time.Second, Hostile: 500, Sample: time.Second}
}

func harnessMain(args []string) error {
	fs := flag.NewFlagSet("reliability", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "quick mode: the CI suite, a few minutes")
	soak := fs.Duration("soak", 0, "run only the churn scenario this long, faults cycling, sampling every 10 s (e.g. 30m)")
	out := fs.String("out", "reliability/results", "directory for the report and charts")
	conns := fs.Int("conns", 0, "connections of the concurrency scenario (default 1000 quick, 9500 full)")
	scens := fs.String("scenarios", "", "comma-separated subset: "+strings.Join(allScenarios, ","))
	tag := fs.String("tag", "", "suffix for the report name")
	hold := fs.Duration("hold", 0, "how long the slowloris and slow-reader clients are held (default 4s quick, 15s full)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: go run ./test/reliability [flags]   (needs root: it builds network namespaces)\n")
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
	if os.Geteuid() != 0 {
		return errors.New("needs root: the testbed creates network namespaces, veths and iptables rules")
	}
	p := paramsFor(*quick)
	if *conns > 0 {
		p.Conns = min(*conns, 9500)
	}
	if *hold > 0 {
		p.Hold = *hold
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
	if *soak > 0 {
		p.Mode, p.Soak, p.Churn, p.Repeat, p.Sample = "soak", *soak, *soak, true, 10*time.Second
		p.Scenarios = []string{sSoak}
	}
	return runHarness(p, *out, *tag)
}

func (p params) runs(s string) bool {
	return len(p.Scenarios) == 0 || slices.Contains(p.Scenarios, s)
}

// run is everything the report is made from.
type runData struct {
	Params    params
	Started   time.Time
	Duration  time.Duration
	Env       []string
	Scenarios []*scenario
	Client    []procStat
	Server    []procStat
	Marks     []mark
	SetupErr  string `json:",omitempty"`
}

func runHarness(p params, outDir, tag string) error {
	t0 := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, args...))
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	consul, err := testbed.Consul()
	if err != nil {
		return err
	}
	logf("reliability %s mode; building ferry", p.Mode)
	ferry, err := testbed.Ferry()
	if err != nil {
		return err
	}
	logf("starting testbed")
	tb, err := testbed.Open(consul, logf)
	if err != nil {
		return err
	}
	e := &env{tb: tb, self: self, ferry: ferry, logf: logf}
	defer func() {
		logf("cleaning up")
		e.stopAll()
		tb.Close()
	}()
	if err := e.setup(); err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	logf("ferry pair ready: fcli dials %s", e.vip)
	e.startSampler(t0, p.Sample)
	var scens []*scenario
	steps := []struct {
		id string
		f  func() *scenario
	}{
		{sConcurrency, func() *scenario { return e.concurrency(p) }},
		{sHostile, func() *scenario { return e.hostileInput(p) }},
		{sExhaustion, func() *scenario { return e.exhaustion(p) }},
		{sChurn, func() *scenario { return e.churn(p, p.Churn, "sustained load with churn") }},
		{sFaults, func() *scenario { return e.faults(p) }},
		{sSoak, func() *scenario { return e.churn(p, p.Soak, fmt.Sprintf("soak (%v of churn)", p.Soak)) }},
	}
	for _, st := range steps {
		if st.id == sSoak && p.Soak == 0 || st.id != sSoak && p.Soak > 0 || !p.runs(st.id) {
			continue
		}
		scens = append(scens, st.f())
		// A scenario that left a sidecar dead would fail every later one.
		for _, sc := range []*sidecar{e.fcli, e.fsrv} {
			if !sc.stat(t0).Alive {
				logf("%s is down; restarting it for the next scenario", sc.name)
				sc.wrap = nil
				if _, err := e.startSidecar(sc); err != nil {
					return err
				}
			}
		}
	}
	e.sampler.close()
	rd := runData{Params: p, Started: t0, Duration: time.Since(t0), Env: describeEnv(consul, ferry), Scenarios: scens,
		Client: e.sampler.cli, Server: e.sampler.srv, Marks: e.sampler.marks}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	name := t0.Format("2006-01-02") + "-" + p.Mode
	if tag != "" {
		name += "-" + tag
	}
	if err := writeJSON(filepath.Join(outDir, name+".json"), rd); err != nil {
		logf("raw results not saved: %v", err)
	}
	if err := e.saveLogs(filepath.Join(outDir, name+"-ferry.log")); err != nil {
		logf("ferry logs not saved: %v", err)
	}
	md, err := writeReport(outDir, name, rd)
	if err != nil {
		return err
	}
	logf("report: %s", md)
	var failed []string
	for _, s := range scens {
		if s.Verdict() != "PASS" {
			failed = append(failed, s.Name+": "+strings.Join(s.Failures, "; "))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d scenario(s) failed:\n  %s", len(failed), strings.Join(failed, "\n  "))
	}
	return nil
}

func describeEnv(consul, ferry string) []string {
	first := func(argv ...string) string {
		cmd, err := testbed.Command(argv[0], argv[1:]...)
		if err != nil {
			return "unknown"
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return "unknown"
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	env := []string{"kernel: " + first("uname", "-r"), "CPUs: " + first("nproc"), "Go: " + first("go", "version"),
		"consul: " + first(consul, "version"), "ferry: " + first(ferry, "version")}
	if root, err := testbed.RepoRoot(); err == nil {
		env = append(env, "commit: "+first("git", "-C", root, "rev-parse", "--short", "HEAD"))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		env = append(env, "load average at the end: "+strings.Join(strings.Fields(string(b))[:3], " "))
	}
	return env
}
