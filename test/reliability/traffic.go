package main

// The traffic the harness runs inside the pods: an echo server and a load
// client whose every byte is checked. A stream is a ping-pong of random
// chunks: the client writes a chunk, reads the echo back in full and compares
// it with what it wrote, so a lost, duplicated or corrupted byte is detected
// at the chunk it happened in, and a stream that ends early is told apart as
// a reset (ECONNRESET/EPIPE: acceptable under a fault), a truncation (a clean
// EOF before the data came back: never acceptable) or a stall.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func raiseNofile() {
	var r syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r) == nil && r.Cur < r.Max {
		r.Cur = r.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	}
}

// serverMain echoes, half-close aware; a connection that ends in an error is
// aborted (RST) so the peer sees an abort as an abort. With -report it
// prints how each connection ended: "end eof|reset|error BYTES".
func serverMain(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	addr := fs.String("addr", ":8080", "listen address")
	report := fs.Bool("report", false, "print one line per connection: end eof|reset|error BYTES")
	if err := fs.Parse(args); err != nil {
		return err
	}
	raiseNofile()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, func() { ln.Close() })
	fmt.Println("ready", ln.Addr())
	var outMu sync.Mutex
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func() {
			tc := c.(*net.TCPConn)
			// A plain buffer copy: io.Copy between TCP sockets splices
			// through a pipe, two more fds per connection, which caps the
			// app at a third of its fd limit.
			n, err := io.CopyBuffer(struct{ io.Writer }{tc}, struct{ io.Reader }{tc}, make([]byte, 8<<10))
			how := "eof"
			if err != nil {
				how = "error"
				if isReset(err) {
					how = "reset"
				}
				tc.SetLinger(0)
			} else {
				tc.CloseWrite()
				// Wait for the client's close so ours is not an RST racing it.
				tc.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, tc)
			}
			tc.Close()
			if *report {
				outMu.Lock()
				fmt.Printf("end %s %d\n", how, n)
				outMu.Unlock()
			}
		}()
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED)
}

// Outcome of one connection.
type outcome int

const (
	okClean     outcome = iota
	connectFail         // dial failed or was refused
	reset               // ECONNRESET / EPIPE during the stream
	truncated           // clean EOF before the echo was complete: data lost
	corrupt             // echo differs from what was sent
	stalled             // no progress within the deadline
	other
)

// counters are cumulative; the client prints them every second ("tick") and
// at the end ("result").
type counters struct {
	Attempted, OK, ConnectFail, Reset, Truncated, Corrupt, Stalled, Other atomic.Int64
	// StreamBreaks counts long streams that ended in anything but a clean
	// close (they are also counted by outcome above).
	StreamBreaks  atomic.Int64
	BytesVerified atomic.Int64
	mu            sync.Mutex
	firstErr      map[outcome]string
	// t0 and the fail* fields time every failure on the load's clock
	// ("fail T kind error" lines), so the harness can say what a span's
	// failures were; at most maxFailLines a second.
	t0       time.Time
	failSec  int64
	failSent int
}

const maxFailLines = 50

func (c *counters) logFail(o outcome, err error) {
	if c.t0.IsZero() {
		return
	}
	t := time.Since(c.t0).Seconds()
	c.mu.Lock()
	if sec := int64(t); sec != c.failSec {
		c.failSec, c.failSent = sec, 0
	}
	c.failSent++
	ok := c.failSent <= maxFailLines
	c.mu.Unlock()
	if ok {
		fmt.Printf("fail %.3f %s %v\n", t, outcomeNames[o], err)
	}
}

type snapshot struct {
	T             float64 `json:"t"`
	Attempted     int64   `json:"attempted"`
	OK            int64   `json:"ok"`
	ConnectFail   int64   `json:"connect_fail"`
	Reset         int64   `json:"reset"`
	Truncated     int64   `json:"truncated"`
	Corrupt       int64   `json:"corrupt"`
	Stalled       int64   `json:"stalled"`
	Other         int64   `json:"other"`
	StreamBreaks  int64   `json:"stream_breaks"`
	BytesVerified int64   `json:"bytes_verified"`
	// Open is how many connections a hold run has open.
	Open     int64             `json:"open,omitempty"`
	OpenSecs float64           `json:"open_secs,omitempty"`
	Errors   map[string]string `json:"errors,omitempty"`
}

var outcomeNames = map[outcome]string{connectFail: "connect", reset: "reset", truncated: "truncated", corrupt: "corrupt", stalled: "stalled", other: "other"}

func (c *counters) add(o outcome, err error) {
	switch o {
	case okClean:
		c.OK.Add(1)
	case connectFail:
		c.ConnectFail.Add(1)
	case reset:
		c.Reset.Add(1)
	case truncated:
		c.Truncated.Add(1)
	case corrupt:
		c.Corrupt.Add(1)
	case stalled:
		c.Stalled.Add(1)
	default:
		c.Other.Add(1)
	}
	if o != okClean && err != nil {
		c.logFail(o, err)
		c.mu.Lock()
		if c.firstErr == nil {
			c.firstErr = map[outcome]string{}
		}
		if _, ok := c.firstErr[o]; !ok {
			c.firstErr[o] = err.Error()
		}
		c.mu.Unlock()
	}
}

func (c *counters) snap(t0 time.Time) snapshot {
	s := snapshot{T: time.Since(t0).Seconds(), Attempted: c.Attempted.Load(), OK: c.OK.Load(),
		ConnectFail: c.ConnectFail.Load(), Reset: c.Reset.Load(), Truncated: c.Truncated.Load(),
		Corrupt: c.Corrupt.Load(), Stalled: c.Stalled.Load(), Other: c.Other.Load(),
		StreamBreaks: c.StreamBreaks.Load(), BytesVerified: c.BytesVerified.Load()}
	c.mu.Lock()
	for o, e := range c.firstErr {
		if s.Errors == nil {
			s.Errors = map[string]string{}
		}
		s.Errors[outcomeNames[o]] = e
	}
	c.mu.Unlock()
	return s
}

func printLine(kind string, s snapshot) {
	b, _ := json.Marshal(s)
	fmt.Printf("%s %s\n", kind, b)
}

// classify names how a read or write of an established stream failed.
func classify(err error) outcome {
	var ne net.Error
	switch {
	case err == nil:
		return okClean
	case isReset(err):
		return reset
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return truncated
	case errors.As(err, &ne) && ne.Timeout():
		return stalled
	}
	return other
}

// exchange sends one chunk and verifies its echo.
func exchange(c net.Conn, buf, got []byte, rng *rand.ChaCha8, cnt *counters, stall time.Duration) (outcome, error) {
	rng.Read(buf)
	c.SetDeadline(time.Now().Add(stall))
	if _, err := c.Write(buf); err != nil {
		return classify(err), fmt.Errorf("write: %w", err)
	}
	n, err := io.ReadFull(c, got)
	if n > 0 && !bytes.Equal(got[:n], buf[:n]) {
		return corrupt, fmt.Errorf("echo differs from what was sent within %d bytes", n)
	}
	cnt.BytesVerified.Add(int64(n))
	if err != nil {
		return classify(err), fmt.Errorf("read after %d of %d bytes: %w", n, len(buf), err)
	}
	return okClean, nil
}

// finish half-closes and expects a clean end with nothing extra.
func finish(c net.Conn, stall time.Duration) (outcome, error) {
	c.(*net.TCPConn).CloseWrite()
	c.SetDeadline(time.Now().Add(stall))
	var one [1]byte
	n, err := c.Read(one[:])
	if n > 0 {
		return corrupt, errors.New("bytes after the echo")
	}
	if errors.Is(err, io.EOF) {
		return okClean, nil
	}
	return classify(err), fmt.Errorf("close: %w", err)
}

type loadConf struct {
	addr        string
	streams     int
	churn       int
	chunk       int
	dur         time.Duration
	stall       time.Duration
	once        bool
	hold        int
	parallel    int
	dialTimeout time.Duration
}

func loadMain(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	var c loadConf
	fs.StringVar(&c.addr, "addr", "", "address to dial")
	fs.IntVar(&c.streams, "streams", 0, "long streams (ping-pong of verified chunks, reconnecting after a break)")
	fs.IntVar(&c.churn, "churn", 0, "workers opening short verified connections in a loop")
	fs.IntVar(&c.chunk, "chunk", 16<<10, "chunk size")
	fs.DurationVar(&c.dur, "dur", 10*time.Second, "how long (streams, churn); SIGTERM ends it early")
	fs.DurationVar(&c.stall, "stall", 10*time.Second, "an exchange without progress this long is a stall")
	fs.BoolVar(&c.once, "once", false, "streams do not reconnect: the run ends when every stream has ended")
	fs.IntVar(&c.hold, "hold", 0, "open this many verified connections, hold them until SIGUSR1, verify each again, close")
	fs.IntVar(&c.parallel, "parallel", 200, "hold: connections opened at once")
	fs.DurationVar(&c.dialTimeout, "dial-timeout", 5*time.Second, "connect timeout")
	if err := fs.Parse(args); err != nil {
		return err
	}
	raiseNofile()
	if c.hold > 0 {
		return runHold(c)
	}
	return runStreams(c)
}

func (c loadConf) dial() (net.Conn, error) {
	return net.DialTimeout("tcp", c.addr, c.dialTimeout)
}

func runStreams(c loadConf) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, c.dur)
	defer cancel()
	t0 := time.Now()
	fmt.Println("start")
	cnt := counters{t0: t0}
	var wg sync.WaitGroup
	for i := range c.streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), 1})
			buf, got := make([]byte, c.chunk), make([]byte, c.chunk)
			for ctx.Err() == nil {
				cnt.Attempted.Add(1)
				conn, err := c.dial()
				if err != nil {
					cnt.add(connectFail, err)
					if c.once {
						return
					}
					time.Sleep(100 * time.Millisecond)
					continue
				}
				o := okClean
				for ctx.Err() == nil && o == okClean {
					o, err = exchange(conn, buf, got, rng, &cnt, c.stall)
				}
				if o == okClean {
					o, err = finish(conn, c.stall)
				}
				if o != okClean {
					cnt.StreamBreaks.Add(1)
					conn.(*net.TCPConn).SetLinger(0)
				}
				conn.Close()
				cnt.add(o, err)
				if c.once {
					return
				}
			}
		}()
	}
	for i := range c.churn {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), 2})
			buf, got := make([]byte, 4096), make([]byte, 4096)
			for ctx.Err() == nil {
				cnt.Attempted.Add(1)
				conn, err := c.dial()
				if err != nil {
					cnt.add(connectFail, err)
					time.Sleep(50 * time.Millisecond)
					continue
				}
				o, err := exchange(conn, buf, got, rng, &cnt, c.stall)
				if o == okClean {
					o, err = finish(conn, c.stall)
				}
				if o != okClean {
					conn.(*net.TCPConn).SetLinger(0)
				}
				conn.Close()
				cnt.add(o, err)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			printLine("tick", cnt.snap(t0))
		case <-done:
			printLine("result", cnt.snap(t0))
			return nil
		}
	}
}

// runHold opens c.hold connections (c.parallel at a time), proves each
// with a verified 1 KiB echo, prints "opened", holds them until SIGUSR1,
// proves each again and closes them cleanly.
func runHold(c loadConf) error {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	t0 := time.Now()
	var cnt counters
	conns := make([]net.Conn, c.hold)
	sem := make(chan struct{}, c.parallel)
	var wg sync.WaitGroup
	var open atomic.Int64
	for i := range c.hold {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			cnt.Attempted.Add(1)
			conn, err := c.dial()
			if err != nil {
				cnt.add(connectFail, err)
				return
			}
			rng := rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), 3})
			buf, got := make([]byte, 1024), make([]byte, 1024)
			if o, err := exchange(conn, buf, got, rng, &cnt, c.stall); o != okClean {
				cnt.add(o, err)
				conn.Close()
				return
			}
			open.Add(1)
			conns[i] = conn
		}()
	}
	wg.Wait()
	s := cnt.snap(t0)
	s.Open, s.OpenSecs = open.Load(), time.Since(t0).Seconds()
	printLine("opened", s)
	<-usr1
	t1 := time.Now()
	for i, conn := range conns {
		if conn == nil {
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			rng := rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), 4})
			buf, got := make([]byte, 64), make([]byte, 64)
			o, err := exchange(conn, buf, got, rng, &cnt, c.stall)
			if o == okClean {
				o, err = finish(conn, c.stall)
			}
			if o != okClean {
				conn.(*net.TCPConn).SetLinger(0)
			}
			conn.Close()
			cnt.add(o, err)
		}()
	}
	wg.Wait()
	s = cnt.snap(t1)
	s.Open = 0
	printLine("result", s)
	return nil
}
