package main

import (
	"errors"
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"sort"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

type chart struct{ title, file string }

// One colour per path, the same in every chart.
var pathColors = map[string]color.RGBA{
	pDirect:     {R: 0x55, G: 0x55, B: 0x55, A: 0xff},
	pFerryPT:    {R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	pFerryMTLS:  {R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	pConsul:     {R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	pHAProxy:    {R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	pFerryPTB:   {R: 0x9e, G: 0xc9, B: 0xe2, A: 0xff},
	pFerryMTLSB: {R: 0x98, G: 0xdf, B: 0x8a, A: 0xff},
}

func writeCharts(dir, name string, paths []*path, res results) ([]chart, error) {
	var live []string
	for _, p := range paths {
		if p.NA == "" && len(res[p.ID]) > 0 {
			live = append(live, p.ID)
		}
	}
	if len(live) == 0 {
		return nil, nil
	}
	var out []chart
	add := func(title, suffix string, make func() (*plot.Plot, error)) (err error) {
		// gonum/plot panics on degenerate input (e.g. a log axis with no
		// data); a chart is not worth losing the report over.
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("%s: %v", title, r)
			}
		}()
		p, err := make()
		if err != nil {
			return fmt.Errorf("%s: %w", title, err)
		}
		file := name + "-" + suffix + ".png"
		width := 9 * vg.Inch
		if suffix == "connrate" {
			width = 6 * vg.Inch // one cluster of bars
		}
		if err := p.Save(width, 5*vg.Inch, filepath.Join(dir, file)); err != nil {
			return fmt.Errorf("%s: %w", title, err)
		}
		out = append(out, chart{title, file})
		return nil
	}
	gbps := func(s sample) float64 { return s.Gbps }
	steps := []struct {
		title, suffix string
		make          func() (*plot.Plot, error)
	}{
		{"Throughput (Gbit/s, median)", "throughput", func() (*plot.Plot, error) {
			return barChart("Bulk throughput (median)", "Gbit/s", live, res,
				[]barGroup{{"1 connection", sBulk1, gbps}, {"64 connections", sBulk64, gbps}})
		}},
		{"Proxy CPU seconds per GB (median)", "cpu", func() (*plot.Plot, error) {
			cpu := func(s sample) float64 { return s.CPUPerGB }
			return barChart("Proxy CPU per GB moved (both sides; lower is better)", "CPU s/GB", withoutDirect(live), res,
				[]barGroup{{"1 connection", sBulk1, cpu}, {"64 connections", sBulk64, cpu}})
		}},
		{"New connections per second (median)", "connrate", func() (*plot.Plot, error) {
			return barChart("New connections: connect, 1 KiB echo, close", "connections/s", live, res,
				[]barGroup{{"conn/s", sCRR, func(s sample) float64 { return s.Rate }}})
		}},
		{"1 KiB request/response latency CDF", "latency", func() (*plot.Plot, error) { return latencyCDF(live, res) }},
		{"1 KiB request/response latency by percentile (tail)", "latency-tail", func() (*plot.Plot, error) { return latencyTail(live, res) }},
	}
	hasRR := false
	for _, id := range live {
		for _, s := range res[id][sRR] {
			hasRR = hasRR || len(s.Lat) > 0
		}
	}
	var errs []error
	for _, s := range steps {
		if strings.HasPrefix(s.suffix, "latency") && !hasRR {
			continue
		}
		if err := add(s.title, s.suffix, s.make); err != nil {
			errs = append(errs, err)
		}
	}
	return out, errors.Join(errs...)
}

func withoutDirect(ids []string) []string {
	var out []string
	for _, id := range ids {
		if id != pDirect {
			out = append(out, id)
		}
	}
	return out
}

type barGroup struct {
	label string
	scen  string
	get   func(sample) float64
}

// barChart draws one cluster per group, one labelled bar per path.
func barChart(title, unit string, ids []string, res results, groups []barGroup) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = unit
	p.Legend.Top = true
	w := vg.Points(min(32, 200/float64(max(1, len(ids)))))
	var labels []string
	for _, g := range groups {
		labels = append(labels, g.label)
	}
	top := 0.0
	for i, id := range ids {
		vals := make(plotter.Values, len(groups))
		var pts plotter.XYs
		var texts []string
		for j, g := range groups {
			v := res.stat(id, g.scen, g.get).Med
			if math.IsNaN(v) {
				v = 0
			}
			vals[j] = v
			top = max(top, v)
			pts = append(pts, plotter.XY{X: float64(j), Y: v})
			texts = append(texts, shortNum(v))
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return nil, err
		}
		bars.Color = pathColors[id]
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(float64(i)-float64(len(ids)-1)/2)
		p.Add(bars)
		p.Legend.Add(pathNames[id], bars)
		lbl, err := plotter.NewLabels(plotter.XYLabels{XYs: pts, Labels: texts})
		if err != nil {
			return nil, err
		}
		for k := range lbl.TextStyle {
			lbl.TextStyle[k].XAlign = draw.XCenter
			lbl.TextStyle[k].Font.Size = vg.Points(9)
		}
		lbl.Offset = vg.Point{X: bars.Offset, Y: vg.Points(3)}
		p.Add(lbl)
	}
	p.NominalX(labels...)
	p.X.Min, p.X.Max = -0.6, float64(len(groups))-0.4
	// Head room for the legend above the tallest bar.
	p.Y.Min, p.Y.Max = 0, top*1.45+1e-9
	return p, nil
}

func shortNum(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// latencyCDF plots every RR sample of every repetition: x latency (log
// scale), y the fraction of requests at or below it.
func latencyCDF(ids []string, res results) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "1 KiB request/response latency at a fixed rate (all repetitions)"
	p.X.Label.Text = "latency (µs, log scale)"
	p.Y.Label.Text = "fraction of requests ≤ x"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Left = false
	p.Legend.Top = false
	p.Legend.XOffs = -10
	p.Legend.YOffs = 10
	p.Add(plotter.NewGrid())
	for _, id := range ids {
		var lat []float64
		for _, s := range res[id][sRR] {
			lat = append(lat, s.Lat...)
		}
		if len(lat) == 0 {
			continue
		}
		sort.Float64s(lat)
		// At most ~2,000 points per line; keep the tail exactly.
		step := max(1, len(lat)/2000)
		var pts plotter.XYs
		for i := 0; i < len(lat); i += step {
			pts = append(pts, plotter.XY{X: max(lat[i], 1), Y: float64(i+1) / float64(len(lat))})
		}
		for i := max(0, len(lat)-200); i < len(lat); i++ {
			pts = append(pts, plotter.XY{X: max(lat[i], 1), Y: float64(i+1) / float64(len(lat))})
		}
		sort.Slice(pts, func(a, b int) bool { return pts[a].Y < pts[b].Y })
		if err := addPathLine(p, id, pts); err != nil {
			return nil, err
		}
	}
	p.Y.Min, p.Y.Max = 0, 1
	return p, nil
}

// addPathLine draws pts as path id's line, in its colour, with a legend entry.
func addPathLine(p *plot.Plot, id string, pts plotter.XYs) error {
	line, err := plotter.NewLine(pts)
	if err != nil {
		return err
	}
	line.Color = pathColors[id]
	line.Width = vg.Points(2)
	p.Add(line)
	p.Legend.Add(pathNames[id], line)
	return nil
}

// nines labels the percentile axis of the tail chart, where x = -log10(1-p).
type nines struct{}

func (nines) Ticks(min, max float64) []plot.Tick {
	var ts []plot.Tick
	for _, t := range []struct {
		p     float64
		label string
	}{{0.5, "p50"}, {0.9, "p90"}, {0.99, "p99"}, {0.999, "p99.9"}, {0.9999, "p99.99"}} {
		x := -math.Log10(1 - t.p)
		if x >= min && x <= max {
			ts = append(ts, plot.Tick{Value: x, Label: t.label})
		}
	}
	return ts
}

// latencyTail plots latency against percentile on a "nines" axis, so the
// p99 and p99.9 the report quotes are visible rather than squeezed into
// the top of a CDF.
func latencyTail(ids []string, res results) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "1 KiB request/response latency by percentile (all repetitions)"
	p.X.Label.Text = "percentile"
	p.Y.Label.Text = "latency (µs, log scale)"
	p.X.Tick.Marker = nines{}
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = 10
	p.Add(plotter.NewGrid())
	xmax := 0.0
	for _, id := range ids {
		var lat []float64
		for _, s := range res[id][sRR] {
			lat = append(lat, s.Lat...)
		}
		if len(lat) < 10 {
			continue
		}
		sort.Float64s(lat)
		n := float64(len(lat))
		var pts plotter.XYs
		// Points evenly spaced on the nines axis, up to the last sample.
		for x := 0.0; ; x += 0.02 {
			q := 1 - math.Pow(10, -x)
			i := int(q * (n - 1))
			if i >= len(lat)-1 {
				break
			}
			pts = append(pts, plotter.XY{X: x, Y: max(lat[i], 1)})
		}
		xLast := -math.Log10(1 / n)
		pts = append(pts, plotter.XY{X: xLast, Y: max(lat[len(lat)-1], 1)})
		xmax = max(xmax, xLast)
		if err := addPathLine(p, id, pts); err != nil {
			return nil, err
		}
	}
	p.X.Min, p.X.Max = 0, xmax
	return p, nil
}
