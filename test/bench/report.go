package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// stat is the median and range of one figure over the repetitions.
type stat struct {
	Med, Min, Max float64
	N             int
}

func (r results) stat(path, scen string, f func(sample) float64) stat {
	var xs []float64
	for _, s := range r[path][scen] {
		xs = append(xs, f(s))
	}
	if len(xs) == 0 {
		return stat{Med: math.NaN()}
	}
	st := stat{Med: median(xs), Min: xs[0], Max: xs[0], N: len(xs)}
	for _, x := range xs {
		st.Min, st.Max = min(st.Min, x), max(st.Max, x)
	}
	return st
}

// spread is (max-min)/median; > 15 % is flagged in the report.
func (s stat) spread() float64 {
	if s.N < 2 || s.Med == 0 {
		return 0
	}
	return (s.Max - s.Min) / math.Abs(s.Med)
}

func (s stat) ok() bool { return s.N > 0 && !math.IsNaN(s.Med) }

// figure names a column: how to get it from a sample and how to print it.
type figure struct {
	scen, title, format string
	get                 func(sample) float64
	higherBetter        bool
}

var figures = []figure{
	{sBulk1, "1 conn Gbit/s", "%.2f", func(s sample) float64 { return s.Gbps }, true},
	{sBulk1, "1 conn proxy CPU s/GB", "%.2f", func(s sample) float64 { return s.CPUPerGB }, false},
	{sBulk64, "64 conns Gbit/s", "%.2f", func(s sample) float64 { return s.Gbps }, true},
	{sBulk64, "64 conns proxy CPU s/GB", "%.2f", func(s sample) float64 { return s.CPUPerGB }, false},
	{sRR, "RR p50 µs", "%.0f", func(s sample) float64 { return s.P50 }, false},
	{sRR, "RR p99 µs", "%.0f", func(s sample) float64 { return s.P99 }, false},
	{sRR, "RR p99.9 µs", "%.0f", func(s sample) float64 { return s.P999 }, false},
	{sRR, "RR proxy CPU µs/req", "%.0f", func(s sample) float64 { return s.CPUPerOp }, false},
	{sCRR, "new conn/s", "%.0f", func(s sample) float64 { return s.Rate }, true},
	{sCRR, "new conn p99 µs", "%.0f", func(s sample) float64 { return s.P99 }, false},
	{sCRR, "proxy CPU µs/conn", "%.0f", func(s sample) float64 { return s.CPUPerOp }, false},
	{sIdle, "idle conns open", "%.0f", func(s sample) float64 { return float64(s.Open) }, true},
	{sIdle, "idle KiB/conn", "%.1f", func(s sample) float64 { return s.KBPerConn }, false},
	{sIdle, "proxy fds/conn", "%.1f", func(s sample) float64 { return s.FDsPerConn }, false},
	{sIdle, "proxy RSS MiB idle→loaded", "", nil, false},
}

// cell is one figure of one path, flagged when its spread is large.
func cell(res results, id string, f figure) string {
	if id == pDirect && (strings.Contains(f.title, "proxy") || f.title == "idle KiB/conn") {
		return "–"
	}
	if f.get == nil {
		base := res.stat(id, sIdle, func(s sample) float64 { return s.RSSBase })
		load := res.stat(id, sIdle, func(s sample) float64 { return s.RSSLoaded })
		return fmtNum("%.1f", base.Med) + " → " + fmtNum("%.1f", load.Med)
	}
	st := res.stat(id, f.scen, f.get)
	c := fmtNum(f.format, st.Med)
	if st.spread() > 0.15 {
		c += "*"
	}
	return c
}

func fmtNum(format string, v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf(format, v)
}

func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func writeReport(dir, name string, paths []*path, res results, m runMeta) (string, error) {
	charts, chartErr := writeCharts(dir, name, paths, res)
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p := m.Params
	w("# ferry benchmark — %s (%s mode)\n\n", m.Started.UTC().Format("2006-01-02 15:04 UTC"), p.Mode)
	flags := map[bool]string{true: " -quick", false: ""}[p.Mode == "quick"] + map[bool]string{true: " -pin", false: ""}[p.Pinned]
	w("Produced by `go run ./test/bench%s` in %.0f s. ", flags, m.Duration.Seconds())
	w("Every path ran in the same testbed (Consul agent + network-namespace pods on one bridge), interleaved: ")
	w("for each of %d repetitions and each scenario, all paths back to back in a random order. ", p.Reps)
	if p.Pinned {
		w("**Pinned** (`-pin`): every proxy process on CPU 1 with one thread (GOMAXPROCS=1, HAProxy nbthread 1), load generator and servers on CPU 0. ")
	}
	w("Figures are medians over the repetitions; this machine is shared and CPU-bound, so compare the ratios measured side by side, not absolute figures across runs. See `docs/bench.md` for the method.\n\n")

	w("Scenarios: **bulk** — one connection sends %s (and 64 connections send %s in total) to a sink; ", human(p.BulkBytes), human(p.Bulk64))
	w("**RR** — 1 KiB request/response at a fixed %d req/s over %d persistent connections for %v (a request delayed by a slow previous response is timed from its scheduled send time, so stalls are not hidden); ", p.RRRate, p.RRConns, p.RRDur)
	w("**new conn** — %d closed-loop workers for %v: connect, 1 KiB echo, close; ", p.CRRWorkers, p.CRRDur)
	w("**idle** — %d established idle connections through the proxies (once per path). ", p.IdleConns)
	w("Proxy CPU is utime+stime from /proc of all the path's proxy processes (both sides of a pair); RSS is their summed VmRSS (kernel memory — socket buffers, pipes — is not in it); fds/conn counts their open file descriptors (sockets, and pipes when a proxy splices).\n\n")

	var live []*path
	for _, pa := range paths {
		if pa.NA == "" {
			live = append(live, pa)
		}
	}
	w("## Results (medians)\n\n")
	for _, tbl := range []struct {
		title string
		scens []string
	}{
		{"Bulk throughput and proxy CPU", []string{sBulk1, sBulk64}},
		{"Request/response latency at a fixed rate", []string{sRR}},
		{"New connections and idle connections", []string{sCRR, sIdle}},
	} {
		var fs []figure
		for _, f := range figures {
			if slices.Contains(tbl.scens, f.scen) {
				fs = append(fs, f)
			}
		}
		w("**%s**\n\n| path |", tbl.title)
		for _, f := range fs {
			w(" %s |", f.title)
		}
		w("\n|---|")
		for range fs {
			w("---:|")
		}
		w("\n")
		for _, pa := range live {
			w("| %s |", pathNames[pa.ID])
			for _, f := range fs {
				w(" %s |", cell(res, pa.ID, f))
			}
			w("\n")
		}
		w("\n")
	}
	for _, pa := range live {
		for _, sm := range res[pa.ID][sIdle] {
			if sm.Errors > 0 {
				w("Idle connections through **%s**: %d failed to open (first error: `%s`); the loader stops after 64 failures.\n\n", pathNames[pa.ID], sm.Errors, sm.FirstErr)
			}
		}
	}
	w("\n`*` = spread (max−min)/median over the repetitions above 15 %%; ranges are in the detail table below.\n\n")

	writeTLSModes(w, live, m)
	writeRatios(w, live, res)
	writeTargets(w, paths, res)

	if len(charts) > 0 {
		w("## Charts\n\n")
		for _, c := range charts {
			w("![%s](%s)\n\n", c.title, c.file)
		}
	}
	if chartErr != nil {
		w("Charts failed: %v\n\n", chartErr)
	}
	var na []*path
	for _, pa := range paths {
		if pa.NA != "" {
			na = append(na, pa)
		}
	}
	if len(na) > 0 {
		w("## Not available in this run\n\n")
		for _, pa := range na {
			w("- **%s**: %s\n", pathNames[pa.ID], pa.NA)
		}
		w("\n")
	}
	if len(m.Failures) > 0 {
		w("## Failed measurements\n\n")
		for _, f := range m.Failures {
			w("- %s\n", f)
		}
		w("\n")
	}
	writeDetail(w, live, res)
	w("## Environment\n\n")
	for _, e := range m.Env {
		w("- %s\n", e)
	}
	file := filepath.Join(dir, name+".md")
	return file, os.WriteFile(file, []byte(b.String()), 0o644)
}

// writeTLSModes says where each path's TLS records were sealed and opened,
// and whether this machine could show kernel TLS at all.
func writeTLSModes(w func(string, ...any), live []*path, m runMeta) {
	w("## TLS mode of each path\n\n| path | TLS records sealed and opened in |\n|---|---|\n")
	for _, pa := range live {
		mode := pa.TLS
		if mode == "" {
			mode = "not recorded"
		}
		w("| %s | %s |\n", pathNames[pa.ID], mode)
	}
	w("\n")
	for _, e := range m.Env {
		if strings.HasPrefix(e, "kernel TLS:") {
			w("%s.\n\n", strings.ToUpper(e[:1])+e[1:])
		}
	}
}

// deltaRatio compares two added latencies. When either is not positive
// the direct path's own tail was the larger one in this run (noise on a
// shared machine), and a ratio would mean nothing.
func deltaRatio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) {
		return "–"
	}
	if a <= 0 || b <= 0 {
		return "n/m (noise)"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func writeRatios(w func(string, ...any), live []*path, res results) {
	w("## Ratios\n\n")
	w("Throughput and connection rate: path ÷ reference (higher is better). CPU, added latency (pXX of the path − pXX direct) and memory: path ÷ reference (lower is better). ")
	w("On this shared 2-vCPU machine the p99 of 1,000 req/s is set by whatever else runs (the direct path's own p99 varies several-fold between repetitions): trust added p50 and the tail chart more than added p99.\n\n")
	w("| path | 1 conn Gbit/s vs direct | 1 conn Gbit/s vs built-in | CPU s/GB vs built-in | 64 conns Gbit/s vs direct | 64 conns vs built-in | added RR p50 | added RR p99 | added p99 vs built-in | new conn/s vs direct | new conn/s vs built-in | proxy CPU µs/conn vs built-in | KiB/idle conn vs built-in |\n")
	w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	g := func(id, scen string, f func(sample) float64) float64 { return res.stat(id, scen, f).Med }
	gbps := func(s sample) float64 { return s.Gbps }
	cpu := func(s sample) float64 { return s.CPUPerGB }
	p99 := func(s sample) float64 { return s.P99 }
	rate := func(s sample) float64 { return s.Rate }
	op := func(s sample) float64 { return s.CPUPerOp }
	kb := func(s sample) float64 { return s.KBPerConn }
	d99 := g(pDirect, sRR, p99)
	c99 := g(pConsul, sRR, p99) - d99
	p50 := func(s sample) float64 { return s.P50 }
	d50 := g(pDirect, sRR, p50)
	for _, pa := range live {
		id := pa.ID
		added := g(id, sRR, p99) - d99
		addedCell := "–"
		if !math.IsNaN(added) {
			addedCell = fmt.Sprintf("%+.0f µs", added)
		}
		added50 := "–"
		if a := g(id, sRR, p50) - d50; !math.IsNaN(a) {
			added50 = fmt.Sprintf("%+.0f µs", a)
		}
		proxyRatio := func(scen string, f func(sample) float64) string {
			if id == pDirect {
				return "–"
			}
			return ratio(g(id, scen, f), g(pConsul, scen, f))
		}
		addedRatio := "–"
		if id != pDirect {
			addedRatio = deltaRatio(added, c99)
		}
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", pathNames[id],
			ratio(g(id, sBulk1, gbps), g(pDirect, sBulk1, gbps)), ratio(g(id, sBulk1, gbps), g(pConsul, sBulk1, gbps)),
			proxyRatio(sBulk1, cpu),
			ratio(g(id, sBulk64, gbps), g(pDirect, sBulk64, gbps)), ratio(g(id, sBulk64, gbps), g(pConsul, sBulk64, gbps)),
			added50, addedCell, addedRatio,
			ratio(g(id, sCRR, rate), g(pDirect, sCRR, rate)), ratio(g(id, sCRR, rate), g(pConsul, sCRR, rate)),
			proxyRatio(sCRR, op), proxyRatio(sIdle, kb))
	}
	w("\n")
}

// writeTargets compares ferry with the built-in pair against issue 9's
// targets. They are reported, never asserted.
func writeTargets(w func(string, ...any), paths []*path, res results) {
	w("## Targets (issue 9) — ferry mTLS pair vs Consul built-in pair, same run\n\n")
	w("| target | ferry | reference | measured ratio | met |\n|---|---:|---:|---:|:---:|\n")
	avail := map[string]string{}
	for _, pa := range paths {
		avail[pa.ID] = pa.NA
	}
	g := func(id, scen string, f func(sample) float64) float64 {
		if _, ok := avail[id]; !ok || avail[id] != "" {
			return math.NaN()
		}
		return res.stat(id, scen, f).Med
	}
	p99 := func(s sample) float64 { return s.P99 }
	d99 := g(pDirect, sRR, p99)
	rows := []struct {
		name, unit   string
		ours, ref    float64
		limit        float64
		atMost       bool
		ourID, refID string
		// scen and get name the figure whose spread decides whether the
		// verdict is flagged as noisy.
		scen string
		get  func(sample) float64
	}{
		{"proxy CPU s/GB (1 conn) ≤ 0.5× built-in", "s/GB", g(pFerryMTLS, sBulk1, func(s sample) float64 { return s.CPUPerGB }), g(pConsul, sBulk1, func(s sample) float64 { return s.CPUPerGB }), 0.5, true, pFerryMTLS, pConsul, sBulk1, func(s sample) float64 { return s.CPUPerGB }},
		{"single-stream throughput ≥ 1.5× built-in", "Gbit/s", g(pFerryMTLS, sBulk1, func(s sample) float64 { return s.Gbps }), g(pConsul, sBulk1, func(s sample) float64 { return s.Gbps }), 1.5, false, pFerryMTLS, pConsul, sBulk1, func(s sample) float64 { return s.Gbps }},
		{"added RR p99 (vs direct) ≤ 0.8× built-in", "µs", g(pFerryMTLS, sRR, p99) - d99, g(pConsul, sRR, p99) - d99, 0.8, true, pFerryMTLS, pConsul, sRR, p99},
		{"new-connection rate ≥ 3× built-in", "conn/s", g(pFerryMTLS, sCRR, func(s sample) float64 { return s.Rate }), g(pConsul, sCRR, func(s sample) float64 { return s.Rate }), 3, false, pFerryMTLS, pConsul, sCRR, func(s sample) float64 { return s.Rate }},
		{"RSS per idle connection ≤ 0.5× built-in", "KiB", g(pFerryMTLS, sIdle, func(s sample) float64 { return s.KBPerConn }), g(pConsul, sIdle, func(s sample) float64 { return s.KBPerConn }), 0.5, true, pFerryMTLS, pConsul, sIdle, func(s sample) float64 { return s.KBPerConn }},
		{"passthrough throughput ≥ 0.8× direct", "Gbit/s", g(pFerryPT, sBulk1, func(s sample) float64 { return s.Gbps }), g(pDirect, sBulk1, func(s sample) float64 { return s.Gbps }), 0.8, false, pFerryPT, pDirect, sBulk1, func(s sample) float64 { return s.Gbps }},
	}
	anyNoisy := false
	for _, r := range rows {
		met := "–"
		rat := math.NaN()
		ratCell := ""
		if strings.HasPrefix(r.name, "added") && (r.ours <= 0 || r.ref <= 0) {
			ratCell = "n/m (noise: direct's p99 was the larger)"
		} else if !math.IsNaN(r.ours) && !math.IsNaN(r.ref) && r.ref != 0 {
			rat = r.ours / r.ref
			if (r.atMost && rat <= r.limit) || (!r.atMost && rat >= r.limit) {
				met = "yes"
			} else {
				met = "no"
			}
		}
		ours := fmtNum("%.2f ", r.ours) + r.unit
		if math.IsNaN(r.ours) {
			ours = "n/a"
			if avail[r.ourID] != "" {
				ours = "n/a (path not available, see below)"
			}
		}
		if ratCell == "" {
			ratCell = fmtNum("%.2f×", rat)
		}
		if met != "–" && noisy(res, r.scen, r.get, r.ourID, r.refID, pDirect) {
			met += "†"
			anyNoisy = true
		}
		w("| %s | %s | %s | %s | %s |\n", r.name, ours, fmtNum("%.2f ", r.ref)+r.unit, ratCell, met)
	}
	if anyNoisy {
		w("\n† a figure behind this verdict varies by more than 50 %% between repetitions: one run does not settle it.\n")
	}
	w("\n")
}

// noisy reports whether the figure varies by more than 50 % across the
// repetitions on any of the paths a target compares.
func noisy(res results, scen string, get func(sample) float64, ids ...string) bool {
	for _, id := range ids {
		if id == pDirect && scen != sRR {
			continue
		}
		st := res.stat(id, scen, get)
		if st.ok() && st.spread() > 0.5 {
			return true
		}
	}
	return false
}

func writeDetail(w func(string, ...any), live []*path, res results) {
	w("## Detail: median [min – max] over repetitions\n\n")
	w("| path | figure | median | min | max | n |\n|---|---|---:|---:|---:|---:|\n")
	for _, pa := range live {
		for _, f := range figures {
			if f.get == nil || (pa.ID == pDirect && (strings.Contains(f.title, "proxy") || f.title == "idle KiB/conn")) {
				continue
			}
			st := res.stat(pa.ID, f.scen, f.get)
			if !st.ok() {
				continue
			}
			w("| %s | %s | %s | %s | %s | %d |\n", pathNames[pa.ID], f.title, fmtNum(f.format, st.Med), fmtNum(f.format, st.Min), fmtNum(f.format, st.Max), st.N)
		}
	}
	w("\n")
}

func human(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}
