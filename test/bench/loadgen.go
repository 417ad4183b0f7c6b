package main

// The load generator and the server it talks to. Both run inside testbed pods
// as subcommands of the harness binary (`bench server`, `bench load`), so
// every byte stays on the testbed bridge.
//
// Wire protocol (no half-close needed: Consul's built-in proxy drops it):
//
//	'S' <uint64 n>  sink: the server reads n bytes, then writes one byte.
//	'E'             echo: the server copies everything back until EOF.

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	modeSink = 'S'
	modeEcho = 'E'
	msgSize  = 1024
)

// raiseNofile lifts the soft fd limit to the hard one; the idle scenario
// holds 10,000+ sockets per process.
func raiseNofile() {
	var r syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r) == nil && r.Cur < r.Max {
		r.Cur = r.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	}
}

// loadResult is what `bench load` prints as JSON on its last line.
type loadResult struct {
	Scenario string  `json:"scenario"`
	Bytes    int64   `json:"bytes,omitempty"`
	Seconds  float64 `json:"seconds"`
	Ops      int64   `json:"ops,omitempty"`
	Errors   int64   `json:"errors,omitempty"`
	FirstErr string  `json:"first_error,omitempty"`
	// LatUS are per-operation latencies in microseconds (rr, crr).
	LatUS []float64 `json:"lat_us,omitempty"`
	// Open is the number of idle connections established (idle).
	Open int `json:"open,omitempty"`
}

type loadConfig struct {
	scenario string
	addr     string
	bytes    int64
	conns    int
	rate     int
	dur      time.Duration
	hold     string // file whose appearance ends the idle hold
	timeout  time.Duration
}

func loadMain(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	var c loadConfig
	fs.StringVar(&c.scenario, "scenario", "bulk", "bulk | rr | crr | idle")
	fs.StringVar(&c.addr, "addr", "", "server host:port")
	fs.Int64Var(&c.bytes, "bytes", 256<<20, "bulk: total bytes (split across -conns)")
	fs.IntVar(&c.conns, "conns", 1, "connections (bulk, rr, idle) or workers (crr)")
	fs.IntVar(&c.rate, "rate", 1000, "rr: requests per second, all connections together")
	fs.DurationVar(&c.dur, "dur", 2*time.Second, "rr, crr: how long to run")
	fs.StringVar(&c.hold, "hold", "", "idle: keep connections open until this file exists")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "hard bound on the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.addr == "" {
		return errors.New("load: -addr is required")
	}
	raiseNofile()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	var r loadResult
	var err error
	switch c.scenario {
	case "bulk":
		r, err = runBulk(ctx, c)
	case "rr":
		r, err = runRR(ctx, c)
	case "crr":
		r, err = runCRR(ctx, c)
	case "idle":
		r, err = runIdle(ctx, c)
	default:
		return fmt.Errorf("load: unknown scenario %q", c.scenario)
	}
	if err != nil {
		return err
	}
	r.Scenario = c.scenario
	return json.NewEncoder(os.Stdout).Encode(r)
}

func dial(ctx context.Context, addr string) (*net.TCPConn, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	if dl, ok := ctx.Deadline(); ok {
		tc.SetDeadline(dl)
	}
	return tc, nil
}

// runBulk sends bytes/conns over each of conns connections at once and
// reports the wall time until every server has acknowledged its last byte.
func runBulk(ctx context.Context, c loadConfig) (loadResult, error) {
	per := c.bytes / int64(c.conns)
	conns := make([]*net.TCPConn, c.conns)
	for i := range conns {
		tc, err := dial(ctx, c.addr)
		if err != nil {
			closeAll(conns)
			return loadResult{}, fmt.Errorf("bulk: dial: %w", err)
		}
		conns[i] = tc
	}
	defer closeAll(conns)
	buf := make([]byte, 256<<10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	start := time.Now()
	errs := make(chan error, c.conns)
	for _, tc := range conns {
		go func() {
			var hdr [9]byte
			hdr[0] = modeSink
			binary.BigEndian.PutUint64(hdr[1:], uint64(per))
			if _, err := tc.Write(hdr[:]); err != nil {
				errs <- err
				return
			}
			for left := per; left > 0; {
				n := min(left, int64(len(buf)))
				if _, err := tc.Write(buf[:n]); err != nil {
					errs <- err
					return
				}
				left -= n
			}
			var ack [1]byte
			_, err := io.ReadFull(tc, ack[:])
			errs <- err
		}()
	}
	for range conns {
		if err := <-errs; err != nil {
			return loadResult{}, fmt.Errorf("bulk: %w", err)
		}
	}
	return loadResult{Bytes: per * int64(c.conns), Seconds: time.Since(start).Seconds(), Ops: int64(c.conns)}, nil
}

// runRR sends 1 KiB requests at a fixed total rate over persistent
// connections. A stall is charged to every request it delays (latency from
// the scheduled send time), but the load generator's own timer slack is not.
func runRR(ctx context.Context, c loadConfig) (loadResult, error) {
	conns := make([]*net.TCPConn, c.conns)
	for i := range conns {
		tc, err := dial(ctx, c.addr)
		if err != nil {
			closeAll(conns)
			return loadResult{}, fmt.Errorf("rr: dial: %w", err)
		}
		if _, err := tc.Write([]byte{modeEcho}); err != nil {
			closeAll(conns)
			return loadResult{}, fmt.Errorf("rr: %w", err)
		}
		conns[i] = tc
	}
	defer closeAll(conns)
	interval := time.Duration(float64(time.Second) * float64(c.conns) / float64(c.rate))
	perConn := int(c.dur / interval)
	start := time.Now().Add(10 * time.Millisecond)
	lats := make([][]float64, c.conns)
	var errCount atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for i, tc := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := make([]byte, msgSize)
			resp := make([]byte, msgSize)
			offset := interval * time.Duration(i) / time.Duration(c.conns)
			out := make([]float64, 0, perConn)
			var prevDone time.Time
			for k := 0; k < perConn && ctx.Err() == nil; k++ {
				due := start.Add(offset + time.Duration(k)*interval)
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
				// A request held back by the previous (slow) response is
				// charged from its due time; one that starts late only
				// because our own timer woke late is charged from now.
				from := time.Now()
				if prevDone.After(due) {
					from = due
				}
				req[0] = byte(k)
				if _, err := tc.Write(req); err != nil {
					errCount.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					break
				}
				if _, err := io.ReadFull(tc, resp); err != nil {
					errCount.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					break
				}
				prevDone = time.Now()
				out = append(out, float64(prevDone.Sub(from).Nanoseconds())/1e3)
			}
			lats[i] = out
		}()
	}
	wg.Wait()
	return latencyResult(start, lats, errCount.Load(), &firstErr), nil
}

// runCRR runs conns closed-loop workers: connect, 1 KiB echo, close.
func runCRR(ctx context.Context, c loadConfig) (loadResult, error) {
	end := time.Now().Add(c.dur)
	lats := make([][]float64, c.conns)
	var errCount atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for i := range c.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := make([]byte, 1+msgSize)
			msg[0] = modeEcho
			resp := make([]byte, msgSize)
			// Bounded in time and count; a failing path must not spin.
			for n := 0; n < 1_000_000 && time.Now().Before(end) && ctx.Err() == nil; n++ {
				t0 := time.Now()
				err := func() error {
					tc, err := dial(ctx, c.addr)
					if err != nil {
						return err
					}
					defer tc.Close()
					tc.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err := tc.Write(msg); err != nil {
						return err
					}
					_, err = io.ReadFull(tc, resp)
					return err
				}()
				if err != nil {
					errCount.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					if errCount.Load() > 1000 {
						return
					}
					time.Sleep(time.Millisecond)
					continue
				}
				lats[i] = append(lats[i], float64(time.Since(t0).Nanoseconds())/1e3)
			}
		}()
	}
	wg.Wait()
	return latencyResult(start, lats, errCount.Load(), &firstErr), nil
}

// runIdle opens conns echo connections (32 dialers at a time), proves each
// one end to end with a 1-byte echo, prints "open N", and holds them until
// the hold file appears or the timeout ends.
func runIdle(ctx context.Context, c loadConfig) (loadResult, error) {
	conns := make([]*net.TCPConn, c.conns)
	var next atomic.Int64
	var errCount atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				// Stop opening after repeated failures (e.g. a proxy out of
				// fds): the report shows how many opened and why not more.
				if i >= c.conns || ctx.Err() != nil || errCount.Load() >= 64 {
					return
				}
				tc, err := dial(ctx, c.addr)
				if err == nil {
					tc.SetDeadline(time.Now().Add(5 * time.Second))
					var b [2]byte
					if _, err = tc.Write([]byte{modeEcho, 'x'}); err == nil {
						_, err = io.ReadFull(tc, b[:1])
					}
					tc.SetDeadline(time.Time{})
					if err != nil {
						tc.Close()
					}
				}
				if err != nil {
					errCount.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				conns[i] = tc
			}
		}()
	}
	wg.Wait()
	defer closeAll(conns)
	open := 0
	for _, tc := range conns {
		if tc != nil {
			open++
		}
	}
	r := loadResult{Seconds: time.Since(start).Seconds(), Open: open, Errors: errCount.Load()}
	if e, ok := firstErr.Load().(string); ok {
		r.FirstErr = e
	}
	fmt.Printf("open %d\n", open)
	if c.hold != "" {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			if _, err := os.Stat(c.hold); err == nil {
				break
			}
			<-tick.C
		}
	}
	return r, nil
}

func closeAll(conns []*net.TCPConn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// percentile returns the p-th percentile (0..100) of sorted samples.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p / 100 * float64(len(sorted)-1))
	return sorted[i]
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// latencyResult merges the workers' latency samples (one op each) of a run
// that began at start.
func latencyResult(start time.Time, lats [][]float64, errs int64, firstErr *atomic.Value) loadResult {
	r := loadResult{Seconds: time.Since(start).Seconds(), Errors: errs}
	for _, l := range lats {
		r.LatUS = append(r.LatUS, l...)
	}
	r.Ops = int64(len(r.LatUS))
	if e, ok := firstErr.Load().(string); ok {
		r.FirstErr = e
	}
	return r
}
