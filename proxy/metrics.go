package proxy

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A tiny Prometheus text-format (0.0.4) implementation: counters, gauges
// and histograms with label sets, enough for the sidecar and without a
// dependency. Hot-path updates are single atomic operations on a series
// resolved once per connection with With.

// Collector writes metric families in the text exposition format.
type Collector interface {
	WritePrometheus(w io.Writer)
}

// MetricSet is an ordered set of collectors served at /metrics. Other
// parts of ferry (mTLS, intentions, catalog) add their own with Register.
type MetricSet struct {
	mu   sync.Mutex
	cols []Collector
}

// Register adds c to the set.
func (s *MetricSet) Register(c Collector) {
	s.mu.Lock()
	s.cols = append(s.cols, c)
	s.mu.Unlock()
}

// WritePrometheus writes every registered collector.
func (s *MetricSet) WritePrometheus(w io.Writer) {
	s.mu.Lock()
	cols := slices.Clone(s.cols)
	s.mu.Unlock()
	bw := bufio.NewWriter(w)
	for _, c := range cols {
		c.WritePrometheus(bw)
	}
	bw.Flush()
}

type family struct {
	name, help, typ string
	labels          []string
	mu              sync.Mutex
	series          map[string]*series // key: joined label values
	buckets         []float64          // histograms only
	// maxSeries, when > 0, bounds the label sets: past it, new ones are
	// counted under every label "other".
	maxSeries int
}

// overflowLabel stands for every label value of the series past a family's
// maxSeries.
const overflowLabel = "other"

type series struct {
	values []string
	// counter/gauge: v (int64). histogram: counts per bucket, sum in nanos.
	v      atomic.Int64
	counts []atomic.Int64
	sum    atomic.Int64 // histogram sum, in the unit's nanos (durations)
}

func newFamily(name, help, typ string, labels []string) *family {
	return &family{name: name, help: help, typ: typ, labels: labels, series: make(map[string]*series)}
}

func (f *family) with(values []string) *series {
	if len(values) != len(f.labels) {
		panic(fmt.Sprintf("metric %s: %d label values for %d labels", f.name, len(values), len(f.labels)))
	}
	// The key is built in a stack buffer and looked up as string(buf),
	// which the compiler does without allocating: With is on the
	// per-connection path.
	var kb [128]byte
	key := kb[:0]
	for i, v := range values {
		if i > 0 {
			key = append(key, 0xff)
		}
		key = append(key, v...)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.series[string(key)]
	if s == nil && f.maxSeries > 0 && len(f.series) >= f.maxSeries {
		other := make([]string, len(values))
		for i := range other {
			other[i] = overflowLabel
		}
		key = []byte(strings.Join(other, "\xff"))
		values = other
		s = f.series[string(key)]
	}
	if s == nil {
		s = &series{values: slices.Clone(values)}
		if f.buckets != nil {
			s.counts = make([]atomic.Int64, len(f.buckets))
		}
		f.series[string(key)] = s
	}
	return s
}

func (f *family) sorted() []*series {
	f.mu.Lock()
	out := make([]*series, 0, len(f.series))
	for _, s := range f.series {
		out = append(out, s)
	}
	f.mu.Unlock()
	slices.SortFunc(out, func(a, b *series) int { return slices.Compare(a.values, b.values) })
	return out
}

func (f *family) header(w io.Writer) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.typ)
}

func labelString(names, values []string, extra ...string) string {
	if len(names) == 0 && len(extra) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	n := 0
	add := func(k, v string) {
		if n > 0 {
			b.WriteByte(',')
		}
		n++
		b.WriteString(k)
		b.WriteString(`="`)
		b.WriteString(escapeLabel(v))
		b.WriteByte('"')
	}
	for i, k := range names {
		add(k, values[i])
	}
	for i := 0; i+1 < len(extra); i += 2 {
		add(extra[i], extra[i+1])
	}
	b.WriteByte('}')
	return b.String()
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)

func escapeLabel(s string) string { return labelEscaper.Replace(s) }

// CounterVec is a counter family.
type CounterVec struct{ f *family }

// NewCounterVec defines a counter family with the given label names.
func NewCounterVec(name, help string, labels ...string) *CounterVec {
	return &CounterVec{newFamily(name, help, "counter", labels)}
}

// Counter is one counter series.
type Counter struct{ s *series }

// With returns the series for the label values (in label order).
func (c *CounterVec) With(values ...string) Counter { return Counter{c.f.with(values)} }

// Add adds n (n >= 0).
func (c Counter) Add(n int64) { c.s.v.Add(n) }

// Inc adds one.
func (c Counter) Inc() { c.s.v.Add(1) }

// Value is the current count.
func (c Counter) Value() int64 { return c.s.v.Load() }

// WritePrometheus implements Collector.
func (c *CounterVec) WritePrometheus(w io.Writer) {
	c.f.header(w)
	for _, s := range c.f.sorted() {
		fmt.Fprintf(w, "%s%s %d\n", c.f.name, labelString(c.f.labels, s.values), s.v.Load())
	}
}

// GaugeVec is a gauge family of integers.
type GaugeVec struct{ f *family }

// NewGaugeVec defines a gauge family.
func NewGaugeVec(name, help string, labels ...string) *GaugeVec {
	return &GaugeVec{newFamily(name, help, "gauge", labels)}
}

// Gauge is one gauge series.
type Gauge struct{ s *series }

// With returns the series for the label values.
func (g *GaugeVec) With(values ...string) Gauge { return Gauge{g.f.with(values)} }

// Add adds n (may be negative).
func (g Gauge) Add(n int64) { g.s.v.Add(n) }

// Set sets the value.
func (g Gauge) Set(n int64) { g.s.v.Store(n) }

// Value is the current value.
func (g Gauge) Value() int64 { return g.s.v.Load() }

// WritePrometheus implements Collector.
func (g *GaugeVec) WritePrometheus(w io.Writer) {
	g.f.header(w)
	for _, s := range g.f.sorted() {
		fmt.Fprintf(w, "%s%s %d\n", g.f.name, labelString(g.f.labels, s.values), s.v.Load())
	}
}

// DurationHistogramVec is a histogram family of durations, in seconds.
type DurationHistogramVec struct{ f *family }

// NewDurationHistogramVec defines a histogram with upper bounds in seconds.
func NewDurationHistogramVec(name, help string, buckets []float64, labels ...string) *DurationHistogramVec {
	f := newFamily(name, help, "histogram", labels)
	f.buckets = slices.Clone(buckets)
	slices.Sort(f.buckets)
	return &DurationHistogramVec{f}
}

// DurationHistogram is one histogram series.
type DurationHistogram struct {
	s       *series
	buckets []float64
}

// With returns the series for the label values.
func (h *DurationHistogramVec) With(values ...string) DurationHistogram {
	return DurationHistogram{h.f.with(values), h.f.buckets}
}

// Observe records d. Buckets are non-cumulative internally; the writer
// accumulates them.
func (h DurationHistogram) Observe(d time.Duration) {
	sec := d.Seconds()
	i, _ := slices.BinarySearch(h.buckets, sec)
	if i < len(h.buckets) {
		h.s.counts[i].Add(1)
	}
	h.s.v.Add(1) // total count (+Inf)
	h.s.sum.Add(int64(d))
}

// Count is the number of observations.
func (h DurationHistogram) Count() int64 { return h.s.v.Load() }

// WritePrometheus implements Collector.
func (h *DurationHistogramVec) WritePrometheus(w io.Writer) {
	h.f.header(w)
	for _, s := range h.f.sorted() {
		var cum int64
		for i, le := range h.f.buckets {
			cum += s.counts[i].Load()
			fmt.Fprintf(w, "%s_bucket%s %d\n", h.f.name,
				labelString(h.f.labels, s.values, "le", formatFloat(le)), cum)
		}
		total := s.v.Load()
		fmt.Fprintf(w, "%s_bucket%s %d\n", h.f.name, labelString(h.f.labels, s.values, "le", "+Inf"), total)
		fmt.Fprintf(w, "%s_sum%s %s\n", h.f.name, labelString(h.f.labels, s.values),
			formatFloat(time.Duration(s.sum.Load()).Seconds()))
		fmt.Fprintf(w, "%s_count%s %d\n", h.f.name, labelString(h.f.labels, s.values), total)
	}
}

func formatFloat(f float64) string {
	if math.IsInf(f, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// Metrics are the data-path metrics of a Proxy.
type Metrics struct {
	Set *MetricSet

	// Connections counts finished or refused connections by direction and
	// outcome (ok, error, idle_timeout, closed, revoked, dial_error,
	// rejected, loop, over_limit, pending_limit, handshake_error, a hook's
	// Refused.Outcome, or a Reject's Route.Outcome: not_ready, ambiguous,
	// unknown_virtual_ip).
	Connections *CounterVec
	// SentBytes is downstream→upstream, ReceivedBytes upstream→downstream,
	// counted when a connection ends.
	SentBytes, ReceivedBytes *CounterVec
	Active                   *GaugeVec
	DialErrors               *CounterVec
	AcceptErrors             *CounterVec
	Duration                 *DurationHistogramVec
}

// NewMetrics defines the data-path metrics and registers them in a new set.
func NewMetrics() *Metrics {
	m := &Metrics{
		Set:           &MetricSet{},
		Connections:   NewCounterVec("ferry_connections_total", "Connections handled, by direction and outcome.", "direction", "outcome"),
		SentBytes:     NewCounterVec("ferry_sent_bytes_total", "Bytes copied from the downstream (accepted) side to the upstream side, counted at connection end.", "direction"),
		ReceivedBytes: NewCounterVec("ferry_received_bytes_total", "Bytes copied from the upstream side to the downstream (accepted) side, counted at connection end.", "direction"),
		Active:        NewGaugeVec("ferry_active_connections", "Connections being pumped now.", "direction"),
		DialErrors:    NewCounterVec("ferry_dial_errors_total", "Failed upstream dials.", "direction"),
		AcceptErrors:  NewCounterVec("ferry_accept_errors_total", "Accept errors the listener backed off from.", "direction"),
		Duration: NewDurationHistogramVec("ferry_connection_duration_seconds", "Lifetime of pumped connections.",
			[]float64{0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600, 3600}, "direction"),
	}
	for _, d := range []Direction{Inbound, Outbound} {
		// Pre-create the series so a scrape shows zeros instead of nothing.
		m.SentBytes.With(d.String())
		m.ReceivedBytes.With(d.String())
		m.Active.With(d.String())
		m.DialErrors.With(d.String())
		m.AcceptErrors.With(d.String())
		m.Connections.With(d.String(), "ok")
	}
	for _, c := range []Collector{m.Connections, m.SentBytes, m.ReceivedBytes, m.Active, m.DialErrors, m.AcceptErrors, m.Duration, processCollector{}} {
		m.Set.Register(c)
	}
	return m
}
