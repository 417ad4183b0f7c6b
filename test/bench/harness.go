package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// runHarness builds the binaries and the testbed, runs the matrix, writes
// the report and tears everything down (also on error; an interrupt is
// handled by the testbed's own signal hook).
func runHarness(pr params, ids []string, outDir, tag string) error {
	t0 := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%5.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, args...))
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	load0 := loadavg()
	if pr.Pinned {
		logf("pinned: proxies on CPU 1 (one thread each), load generator and servers on CPU 0")
	}
	logf("bench %s mode: %d repetitions, paths %s", pr.Mode, pr.Reps, strings.Join(ids, ","))
	consul, err := testbed.Consul()
	if err != nil {
		return err
	}
	e := &env{self: self, consul: consul, logf: logf, pin: pr.Pinned, ferryB: pr.FerryB}
	if needsFerry(ids) {
		logf("building ferry")
		if e.ferry, err = testbed.Ferry(); err != nil {
			logf("ferry did not build: %v", err)
			e.ferry = ""
		}
	}
	if e.work, err = os.MkdirTemp("", "ferry-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(e.work)
	// The ferry processes run as the proxy UID and read nothing here, but
	// keep the directory traversable for them anyway.
	os.Chmod(e.work, 0o755)

	logf("starting testbed (consul agent, pods)")
	tb, err := testbed.Open(consul, logf)
	if err != nil {
		return err
	}
	e.tb = tb
	defer func() {
		logf("cleaning up")
		e.stopAll()
		tb.Close()
	}()
	paths, err := e.setupPaths(ids)
	if err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	res, failures := e.runMatrix(paths, pr)
	e.tlsModes(paths)

	meta := runMeta{
		Params:   pr,
		Started:  t0,
		Duration: time.Since(t0),
		Env:      append(describeEnv(consul, e.ferry, e.ferryB), "load average (1/5/15 min) at start: "+load0+"; at end: "+loadavg()),
		Failures: failures,
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	name := t0.Format("2006-01-02") + "-" + pr.Mode
	if pr.Pinned {
		name += "-pinned"
	}
	if tag != "" {
		name += "-" + tag
	}
	if err := saveRaw(filepath.Join(outDir, name+".json"), rawRun{Meta: meta, Paths: paths, Results: res}); err != nil {
		logf("raw results not saved: %v", err)
	}
	md, err := writeReport(outDir, name, paths, res, meta)
	if err != nil {
		return err
	}
	logf("report: %s", md)
	return nil
}

func needsFerry(ids []string) bool {
	for _, id := range ids {
		if id == pFerryPT || id == pFerryMTLS || id == pFerryPTB || id == pFerryMTLSB {
			return true
		}
	}
	return false
}

// rawRun is everything a report is made from, saved next to it so the
// report can be re-rendered (-from FILE) without measuring again.
type rawRun struct {
	Meta    runMeta
	Paths   []*path
	Results results
}

func saveRaw(file string, r rawRun) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}

// rerender rewrites the report and charts of a saved run.
func rerender(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var r rawRun
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	md, err := writeReport(filepath.Dir(file), strings.TrimSuffix(filepath.Base(file), ".json"), r.Paths, r.Results, r.Meta)
	if err == nil {
		fmt.Fprintln(os.Stderr, "report:", md)
	}
	return err
}

type runMeta struct {
	Params   params
	Started  time.Time
	Duration time.Duration
	Env      []string
	Failures []string
}

// describeEnv records what the figures depend on.
func describeEnv(consul, ferry, ferryB string) []string {
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
	var env []string
	env = append(env, "kernel: "+first("uname", "-r"))
	env = append(env, "CPUs: "+first("nproc"))
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				env = append(env, "CPU model: "+strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":")))
				break
			}
		}
	}
	env = append(env, "Go: "+first("go", "version"))
	env = append(env, "consul: "+first(consul, "version"))
	env = append(env, "haproxy: "+first("haproxy", "-v"))
	if ferry != "" {
		env = append(env, "ferry: "+first(ferry, "version"))
	}
	if ferryB != "" {
		env = append(env, "ferry (B) paths: "+ferryB+" — "+first(ferryB, "version"))
	}
	if root, err := testbed.RepoRoot(); err == nil {
		env = append(env, "commit: "+first("git", "-C", root, "rev-parse", "--short", "HEAD"))
	}
	env = append(env, kernelTLSNote())
	env = append(env, "load generator & server: "+filepath.Base(os.Args[0])+" (test/bench), same binary in every pod")
	return env
}

// loadavg tells the reader how busy the shared machine was.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
