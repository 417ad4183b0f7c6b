package main

import (
	"context"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// startServer runs the bench server on a loopback port; stop ends it and
// waits for every handler.
func startServer(t *testing.T) (addr string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, ln) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("server did not stop")
		}
	}
	t.Cleanup(stop)
	return ln.Addr().String(), stop
}

func TestScenariosOverLoopback(t *testing.T) {
	before := runtime.NumGoroutine()
	addr, stop := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	r, err := runBulk(ctx, loadConfig{addr: addr, bytes: 8 << 20, conns: 4})
	if err != nil {
		t.Fatal(err)
	}
	if r.Bytes != 8<<20 || r.Seconds <= 0 {
		t.Errorf("bulk: %+v", r)
	}

	r, err = runRR(ctx, loadConfig{addr: addr, conns: 2, rate: 400, dur: 250 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.Errors != 0 || r.Ops != 100 || len(r.LatUS) != 100 {
		t.Errorf("rr: ops %d errors %d (%s), want 100 and 0", r.Ops, r.Errors, r.FirstErr)
	}

	r, err = runCRR(ctx, loadConfig{addr: addr, conns: 2, dur: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.Errors != 0 || r.Ops == 0 {
		t.Errorf("crr: ops %d errors %d (%s)", r.Ops, r.Errors, r.FirstErr)
	}

	hold := filepath.Join(t.TempDir(), "hold")
	os.WriteFile(hold, nil, 0o644) // release at once
	r, err = runIdle(ctx, loadConfig{addr: addr, conns: 50, hold: hold})
	if err != nil {
		t.Fatal(err)
	}
	if r.Open != 50 || r.Errors != 0 {
		t.Errorf("idle: open %d errors %d (%s)", r.Open, r.Errors, r.FirstErr)
	}

	// A dead address fails fast and clearly, it does not hang.
	dead := deadAddr(t)
	if _, err := runBulk(ctx, loadConfig{addr: dead, bytes: 1, conns: 1}); err == nil {
		t.Error("bulk to a closed port succeeded")
	}
	r, _ = runCRR(ctx, loadConfig{addr: dead, conns: 1, dur: 100 * time.Millisecond})
	if r.Ops != 0 || r.Errors == 0 || r.FirstErr == "" {
		t.Errorf("crr to a closed port: %+v", r)
	}

	cancel()
	stop()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("goroutines: %d before, %d after", before, n)
	}
}

func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func TestStats(t *testing.T) {
	for _, c := range []struct {
		xs   []float64
		want float64
	}{
		{nil, 0}, {[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(c.xs); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.xs, got, c.want)
		}
	}
	sorted := make([]float64, 1000)
	for i := range sorted {
		sorted[i] = float64(i + 1)
	}
	for _, c := range []struct{ p, want float64 }{{50, 500}, {99, 990}, {99.9, 999}, {100, 1000}, {0, 1}} {
		if got := percentile(sorted, c.p); got != c.want {
			t.Errorf("percentile(%v) = %v, want %v", c.p, got, c.want)
		}
	}
	res := results{}
	for _, g := range []float64{10, 8, 12} {
		res.add("x", sBulk1, sample{Gbps: g})
	}
	st := res.stat("x", sBulk1, func(s sample) float64 { return s.Gbps })
	if st.Med != 10 || st.Min != 8 || st.Max != 12 || st.N != 3 || math.Abs(st.spread()-0.4) > 1e-9 {
		t.Errorf("stat = %+v spread %v", st, st.spread())
	}
	if st := res.stat("y", sBulk1, func(s sample) float64 { return s.Gbps }); st.ok() {
		t.Errorf("stat of a missing path is ok: %+v", st)
	}
	if got := procCPU(os.Getpid()); got < 0 {
		t.Errorf("procCPU(self) = %v", got)
	}
}
