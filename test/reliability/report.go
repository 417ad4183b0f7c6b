package main

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

func writeReport(dir, name string, rd runData) (string, error) {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# ferry reliability — %s (%s mode)\n\n", rd.Started.Format("2006-01-02 15:04 MST"), rd.Params.Mode)
	w("`make reliability%s` ran %v. Every app connection is a stream of random chunks, each echoed back and compared byte for byte, so a lost, corrupted or silently truncated byte is counted, not guessed. Sidecar figures are read from `/proc/<pid>` (VmRSS, open fds, threads) and goroutines from ferry's `/metrics` (`ferry_goroutines`; - where the sidecar did not answer).\n\n",
		map[string]string{"quick": " QUICK=1", "full": "", "soak": " SOAK=" + rd.Params.Soak.String()}[rd.Params.Mode], rd.Duration.Round(1e9))
	w("| scenario | verdict | connections attempted | failed | reset | truncated | corrupted | bytes verified |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range rd.Scenarios {
		w("| %s | **%s** | %d | %d | %d | %d | %d | %s |\n", s.Name, s.Verdict(), s.Attempted, s.Failed, s.Reset, s.Truncated, s.Corrupt, bytesStr(s.BytesVerified))
	}
	w("\n\"failed\" counts connects that failed, stalls and other errors; \"reset\" counts streams that ended in a reset (acceptable where a fault concerns them: see each scenario); \"truncated\" and \"corrupted\" must be 0.\n\n")
	charts := writeCharts(dir, name, rd)
	for _, c := range charts {
		w("![%s](%s)\n\n", c[0], c[1])
	}
	if len(rd.Marks) > 0 {
		w("<details><summary>Chart marks (seconds since start)</summary>\n\n")
		for _, m := range rd.Marks {
			w("- %.0f s: %s\n", m.T, m.Name)
		}
		w("\n</details>\n\n")
	}
	for _, s := range rd.Scenarios {
		w("## %s — %s\n\n", s.Name, s.Verdict())
		w("- **Load**: %s\n- **Fault**: %s\n", s.Load, s.Fault)
		for _, f := range s.Failures {
			w("- **FAILURE**: %s\n", oneLine(f))
		}
		for _, f := range s.Findings {
			w("- **Finding**: %s\n", oneLine(f))
		}
		for _, d := range s.Details {
			w("- %s\n", d)
		}
		w("\n")
		if len(s.Stats) > 0 {
			w("| sidecar | reading | alive | RSS (KiB) | fds | goroutines | threads | CPU s |\n|---|---|---|---:|---:|---:|---:|---:|\n")
			for _, k := range []string{"client", "server"} {
				for _, when := range []string{"before", "during", "idle", "slowloris", "slow readers", "peak", "after"} {
					st, ok := s.Stats[k][when]
					if !ok {
						continue
					}
					w("| %s | %s | %v | %d | %d | %s | %d | %.2f |\n", k, when, st.Alive, st.RSSKiB, st.FDs, goroutineStr(st.Goroutines), st.Threads, st.CPU)
				}
			}
			w("\n")
		}
		if len(s.Phases) > 0 {
			w("| span | seconds | connections | ok | connect failed | reset | stalled | long streams broken | truncated | corrupted | verified | failures expected? |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
			for _, ph := range s.Phases {
				d := ph.Delta
				exp := ph.Expected
				if exp == "" {
					exp = "no (goal 0)"
				}
				name := ph.Name
				if ph.Settled > 0 {
					name += fmt.Sprintf(" (verified traffic again %.1f s after)", ph.Settled)
				}
				w("| %s | %.0f | %d | %d | %d | %d | %d | %d | %d | %d | %s | %s |\n", name, ph.To-ph.From, d.Attempted, d.OK, d.ConnectFail, d.Reset, d.Stalled, d.StreamBreaks, d.Truncated, d.Corrupt, bytesStr(d.BytesVerified), exp)
			}
			w("\n")
		}
	}
	w("## Environment\n\n")
	for _, e := range rd.Env {
		w("- %s\n", e)
	}
	file := filepath.Join(dir, name+".md")
	return file, os.WriteFile(file, []byte(b.String()), 0o644)
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 800 {
		s = s[:800] + "…"
	}
	return s
}

// writeCharts draws the sidecars' RSS and fds over the run; it returns
// (title, file) pairs. A chart that fails is left out.
func writeCharts(dir, name string, rd runData) [][2]string {
	var out [][2]string
	for _, c := range []struct {
		suffix, title, unit string
		val                 func(procStat) float64
	}{
		{"rss", "Sidecar memory (VmRSS) over the run", "MiB", func(s procStat) float64 { return float64(s.RSSKiB) / 1024 }},
		{"fds", "Sidecar open file descriptors over the run", "fds", func(s procStat) float64 { return float64(s.FDs) }},
		{"goroutines", "Sidecar goroutines over the run", "goroutines", func(s procStat) float64 { return float64(s.Goroutines) }},
	} {
		file := name + "-" + c.suffix + ".png"
		if err := timeline(filepath.Join(dir, file), c.title, c.unit, rd, c.val); err != nil {
			fmt.Fprintf(os.Stderr, "chart %s: %v\n", file, err)
			continue
		}
		out = append(out, [2]string{c.title, file})
	}
	return out
}

func timeline(file, title, unit string, rd runData, val func(procStat) float64) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "seconds since start (dashed: scenario and fault marks)"
	p.Y.Label.Text = unit
	p.Legend.Top = true
	ymax := 1.0
	for i, side := range []struct {
		name string
		xs   []procStat
		col  color.RGBA
	}{{"client-side ferry", rd.Client, color.RGBA{0x1f, 0x77, 0xb4, 0xff}}, {"server-side ferry", rd.Server, color.RGBA{0x2c, 0xa0, 0x2c, 0xff}}} {
		var pts plotter.XYs
		for _, s := range side.xs {
			if s.Alive && val(s) >= 0 { // -1: no reading
				pts = append(pts, plotter.XY{X: s.T, Y: val(s)})
				ymax = max(ymax, val(s))
			}
		}
		if len(pts) == 0 {
			continue
		}
		l, err := plotter.NewScatter(pts)
		if err != nil {
			return err
		}
		l.GlyphStyle.Color = side.col
		l.GlyphStyle.Radius = vg.Points(1.2)
		_ = i
		p.Add(l)
		p.Legend.Add(side.name, l)
	}
	for _, m := range rd.Marks {
		ml, err := plotter.NewLine(plotter.XYs{{X: m.T, Y: 0}, {X: m.T, Y: ymax * 1.05}})
		if err != nil {
			return err
		}
		ml.Color = color.RGBA{0xaa, 0xaa, 0xaa, 0xff}
		ml.Dashes = []vg.Length{vg.Points(2), vg.Points(3)}
		p.Add(ml)
	}
	p.Y.Min = 0
	return p.Save(10*vg.Inch, 4*vg.Inch, file)
}

func goroutineStr(n int) string {
	if n < 0 {
		return "-"
	}
	return strconv.Itoa(n)
}
