package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Scenario ids.
const (
	sBulk1  = "bulk1"
	sBulk64 = "bulk64"
	sRR     = "rr"
	sCRR    = "crr"
	sIdle   = "idle"
)

// sample is one measurement of one scenario on one path.
type sample struct {
	Gbps       float64 // bulk
	CPUPerGB   float64 // bulk: proxy CPU seconds per GB moved (all proxy processes)
	P50, P99   float64 // rr, crr: µs
	P999       float64
	Rate       float64 // crr: connections/s; rr: achieved req/s
	CPUPerOp   float64 // rr, crr: proxy CPU µs per request / connection
	Errors     int64
	RSSBase    float64 // idle: proxy RSS (MiB) before
	RSSLoaded  float64 // idle: with the connections open
	KBPerConn  float64 // idle
	FDsPerConn float64 // idle: proxy file descriptors per connection
	Open       int
	FirstErr   string    // idle: why a connection failed, if one did
	Lat        []float64 // rr: all latencies (µs), for the CDF
}

// results[path][scenario] holds one sample per repetition.
type results map[string]map[string][]sample

func (r results) add(path, scen string, s sample) {
	if r[path] == nil {
		r[path] = map[string][]sample{}
	}
	r[path][scen] = append(r[path][scen], s)
}

// proxyCPU is the summed utime+stime (seconds) of the path's proxies.
func proxyCPU(ps []*testbed.Process) float64 {
	var t float64
	for _, p := range ps {
		t += procCPU(p.PID())
	}
	return t
}

func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line, in clock ticks (USER_HZ = 100).
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / 100
}

// proxyRSS is the summed VmRSS (MiB) of the path's proxies.
func proxyRSS(ps []*testbed.Process) float64 {
	var kb float64
	for _, p := range ps {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID()))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				f := strings.Fields(v)
				if len(f) > 0 {
					n, _ := strconv.ParseFloat(f[0], 64)
					kb += n
				}
			}
		}
	}
	return kb / 1024
}

// proxyFDs counts the open file descriptors of the path's proxies: a
// proxied connection costs sockets and, with splice, pipes too, and the
// process's RLIMIT_NOFILE caps how many it can hold.
func proxyFDs(ps []*testbed.Process) int {
	n := 0
	for _, p := range ps {
		if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.PID())); err == nil {
			n += len(ents)
		}
	}
	return n
}

// load runs `bench load` in the path's client pod and returns its result
// and the proxies' CPU seconds spent meanwhile.
func (e *env) load(p *path, timeout time.Duration, args ...string) (loadResult, float64, error) {
	argv := e.app(append([]string{e.self, "load", "-addr", p.Addr, "-timeout", timeout.String()}, args...)...)
	cpu0 := proxyCPU(p.Proxies)
	out, err := e.exec(p.Client, testbed.Proc{Name: "load " + p.ID}, timeout+15*time.Second, argv...)
	cpu := proxyCPU(p.Proxies) - cpu0
	if err != nil {
		return loadResult{}, cpu, fmt.Errorf("%v: %s", err, lastLine(out))
	}
	var r loadResult
	if err := json.Unmarshal([]byte(lastLine(out)), &r); err != nil {
		return r, cpu, fmt.Errorf("load output: %v: %q", err, lastLine(out))
	}
	return r, cpu, nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// measure runs one scenario once on one path.
func (e *env) measure(p *path, scen string, pr params) (sample, error) {
	var s sample
	switch scen {
	case sBulk1, sBulk64:
		conns, bytes := 1, pr.BulkBytes
		if scen == sBulk64 {
			conns, bytes = 64, pr.Bulk64
		}
		r, cpu, err := e.load(p, 60*time.Second, "-scenario", "bulk", "-conns", strconv.Itoa(conns), "-bytes", strconv.FormatInt(bytes, 10))
		if err != nil {
			return s, err
		}
		s.Gbps = float64(r.Bytes) * 8 / r.Seconds / 1e9
		s.CPUPerGB = cpu / (float64(r.Bytes) / 1e9)
	case sRR:
		r, cpu, err := e.load(p, pr.RRDur+20*time.Second, "-scenario", "rr", "-conns", strconv.Itoa(pr.RRConns),
			"-rate", strconv.Itoa(pr.RRRate), "-dur", pr.RRDur.String())
		if err != nil {
			return s, err
		}
		s.latencies(r, cpu)
		s.Lat = r.LatUS
		if r.Ops == 0 {
			return s, fmt.Errorf("no request completed: %s", r.FirstErr)
		}
	case sCRR:
		r, cpu, err := e.load(p, pr.CRRDur+20*time.Second, "-scenario", "crr", "-conns", strconv.Itoa(pr.CRRWorkers), "-dur", pr.CRRDur.String())
		if err != nil {
			return s, err
		}
		s.latencies(r, cpu)
		if r.Ops == 0 {
			return s, fmt.Errorf("no connection completed: %s", r.FirstErr)
		}
	case sIdle:
		return e.measureIdle(p, pr)
	}
	return s, nil
}

// measureIdle opens pr.IdleConns connections through the path, waits for
// them to be established end to end, and reads the proxies' RSS.
func (e *env) measureIdle(p *path, pr params) (sample, error) {
	var s sample
	hold := e.file("hold-" + p.ID)
	os.Remove(hold)
	defer os.Remove(hold)
	s.RSSBase = proxyRSS(p.Proxies)
	fd0 := proxyFDs(p.Proxies)
	timeout := 120 * time.Second
	lp, err := p.Client.StartProcess(testbed.Proc{Name: "idle " + p.ID}, e.app(e.self, "load", "-addr", p.Addr,
		"-scenario", "idle", "-conns", strconv.Itoa(pr.IdleConns), "-hold", hold, "-timeout", timeout.String())...)
	if err != nil {
		return s, err
	}
	defer lp.Stop()
	exec0 := time.Now()
	if err := lp.WaitOutput("open ", timeout); err != nil {
		return s, err
	}
	// Let the proxies finish their side of the last handshakes.
	time.Sleep(time.Second)
	s.RSSLoaded = proxyRSS(p.Proxies)
	fd1 := proxyFDs(p.Proxies)
	fmt.Sscanf(lp.Output()[strings.Index(lp.Output(), "open "):], "open %d", &s.Open)
	os.WriteFile(hold, nil, 0o644)
	if err := lp.Wait(30 * time.Second); err != nil {
		return s, fmt.Errorf("idle: %v: %s", err, lastLine(lp.Output()))
	}
	var r loadResult
	if err := json.Unmarshal([]byte(lastLine(lp.Output())), &r); err == nil {
		s.Errors = r.Errors
		s.FirstErr = r.FirstErr
	}
	if s.Errors > 0 {
		for _, pp := range p.Proxies {
			s.FirstErr += "; " + pp.Name + " says: " + oneLine(lastLines(pp.Output(), 2))
		}
	}
	if s.Open > 0 {
		s.KBPerConn = (s.RSSLoaded - s.RSSBase) * 1024 / float64(s.Open)
		s.FDsPerConn = float64(fd1-fd0) / float64(s.Open)
	}
	e.logf("  idle %-10s %d of %d open in %.1fs, proxy RSS %.1f -> %.1f MiB (%.1f KiB/conn, %.1f fds/conn), %d errors %s",
		p.ID, s.Open, pr.IdleConns, time.Since(exec0).Seconds(), s.RSSBase, s.RSSLoaded, s.KBPerConn, s.FDsPerConn, s.Errors, s.FirstErr)
	// Give the proxies time to see the closes before the next path runs.
	time.Sleep(2 * time.Second)
	return s, nil
}

// runMatrix runs every scenario on every available path: for each
// repetition and scenario the paths run back to back in a fresh random
// order, so drift on the shared machine hits all paths alike.
func (e *env) runMatrix(paths []*path, pr params) (results, []string) {
	res := results{}
	var failures []string
	var live []*path
	for _, p := range paths {
		if p.NA == "" {
			live = append(live, p)
		}
	}
	e.logf("warm-up")
	for _, p := range live {
		e.load(p, 30*time.Second, "-scenario", "bulk", "-bytes", strconv.Itoa(32<<20))
		e.load(p, 30*time.Second, "-scenario", "crr", "-conns", "4", "-dur", "300ms")
	}
	var scens []string
	for _, sc := range []string{sBulk1, sBulk64, sRR, sCRR} {
		if pr.runs(sc) {
			scens = append(scens, sc)
		}
	}
	for rep := 1; rep <= pr.Reps && len(scens) > 0; rep++ {
		for _, scen := range scens {
			order := append([]*path(nil), live...)
			rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for _, p := range order {
				// Let the previous run's sockets close first.
				time.Sleep(200 * time.Millisecond)
				s, err := e.measure(p, scen, pr)
				if err != nil {
					msg := fmt.Sprintf("rep %d %s %s: %s", rep, scen, p.ID, oneLine(err.Error()))
					failures = append(failures, msg)
					e.logf("  FAILED %s", msg)
					continue
				}
				res.add(p.ID, scen, s)
				e.logf("  rep %d/%d %-6s %-10s %s", rep, pr.Reps, scen, p.ID, s.brief(scen))
			}
		}
	}
	if !pr.runs(sIdle) {
		return res, failures
	}
	e.logf("idle connections (%d per path, once per path)", pr.IdleConns)
	for _, p := range live {
		s, err := e.measure(p, sIdle, pr)
		if err != nil {
			msg := fmt.Sprintf("idle %s: %s", p.ID, oneLine(err.Error()))
			failures = append(failures, msg)
			e.logf("  FAILED %s", msg)
			continue
		}
		res.add(p.ID, sIdle, s)
	}
	return res, failures
}

func (s sample) brief(scen string) string {
	switch scen {
	case sBulk1, sBulk64:
		return fmt.Sprintf("%6.2f Gbit/s  %5.2f proxy CPU s/GB", s.Gbps, s.CPUPerGB)
	case sRR:
		return fmt.Sprintf("p50 %5.0f µs  p99 %5.0f µs  p99.9 %5.0f µs  (%0.f req/s)", s.P50, s.P99, s.P999, s.Rate)
	case sCRR:
		line := fmt.Sprintf("%6.0f conn/s  p99 %5.0f µs  %4.0f proxy CPU µs/conn  %d errors", s.Rate, s.P99, s.CPUPerOp, s.Errors)
		if s.FirstErr != "" {
			line += " (first: " + s.FirstErr + ")"
		}
		return line
	}
	return ""
}

// latencies fills the percentiles, rate, errors and CPU per operation of a
// latency run (rr, crr); it sorts r.LatUS.
func (s *sample) latencies(r loadResult, cpu float64) {
	sort.Float64s(r.LatUS)
	s.P50, s.P99, s.P999 = percentile(r.LatUS, 50), percentile(r.LatUS, 99), percentile(r.LatUS, 99.9)
	s.Rate = float64(r.Ops) / r.Seconds
	s.Errors, s.FirstErr = r.Errors, r.FirstErr
	if r.Ops > 0 {
		s.CPUPerOp = cpu * 1e6 / float64(r.Ops)
	}
}
