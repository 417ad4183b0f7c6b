// Command echo is the test app of ferry's end-to-end tests, demo and bench:
// a server that echoes (half-close aware) and a client that sends a known
// byte stream, half-closes, and verifies what comes back by SHA-256.
//
//	echo server -addr :8080 [-report] [-reset-token RESET-ME]   (token, its echo, one byte from the client, then RST)
//	echo client -addr 240.0.0.1:80 -bytes 1048576 [-conns 10] [-hold 5s] [-pace 20s] [-no-half-close]
//	echo client -addr ... -bytes 1000 -reset   (send, read the echo, then abort with RST)
//	echo client -addr ... -send RESET-ME -expect-reset   (the server must abort: ECONNRESET, never EOF)
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: echo server|client [flags]")
	}
	switch args[0] {
	case "server":
		return server(args[1:])
	case "client":
		return client(args[1:])
	}
	return fmt.Errorf("unknown mode %q", args[0])
}

func server(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	addr := fs.String("addr", ":8080", "listen address")
	quiet := fs.Bool("quiet", false, "do not print a line per connection")
	report := fs.Bool("report", false, "print how each connection's stream ended: end N read=BYTES err=EOF|<error>")
	resetToken := fs.String("reset-token", "", "a connection whose first bytes are this token gets them echoed, then a reset (RST)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() { <-ctx.Done(); ln.Close() }()
	fmt.Printf("ready %s\n", ln.Addr())
	var n atomic.Int64
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		k := n.Add(1)
		if !*quiet {
			fmt.Printf("accept %d %s\n", k, c.RemoteAddr())
		}
		go func() {
			defer c.Close()
			tc := c.(*net.TCPConn)
			var read int64
			if *resetToken != "" {
				head := make([]byte, len(*resetToken))
				m, err := io.ReadFull(c, head)
				read += int64(m)
				if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
					// A reset is reported once by the kernel: the echo
					// below would read a clean EOF after it.
					if *report {
						fmt.Printf("end %d read=%d err=%s\n", k, read, err)
					}
					return
				}
				c.Write(head[:m])
				if err == nil && string(head) == *resetToken {
					// The client's next byte says the echo arrived: a
					// reset now cannot overtake it.
					io.ReadFull(c, make([]byte, 1))
					tc.SetLinger(0)
					fmt.Printf("reset %d\n", k)
					return
				}
			}
			// Echo until the client half-closes, then half-close back so
			// the client sees EOF after the last byte.
			var err error
			if *report {
				_, err = io.Copy(c, readCounter{c, &read})
			} else {
				_, err = io.Copy(c, c) // splices
			}
			tc.CloseWrite()
			if *report {
				end := "EOF"
				if err != nil {
					end = err.Error()
				}
				fmt.Printf("end %d read=%d err=%s\n", k, read, end)
			}
		}()
	}
}

func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	addr := fs.String("addr", "", "server address host:port")
	size := fs.Int64("bytes", 1<<20, "bytes to send on each connection")
	conns := fs.Int("conns", 1, "concurrent connections")
	hold := fs.Duration("hold", 0, "after connecting, wait this long before sending")
	timeout := fs.Duration("timeout", 60*time.Second, "deadline for each connection")
	pace := fs.Duration("pace", 0, "spread the sending of -bytes evenly over this long (a live, slow stream)")
	noHalfClose := fs.Bool("no-half-close", false, "do not half-close after sending; read back exactly -bytes, then close (for proxies that cut half-closed streams)")
	reset := fs.Bool("reset", false, "send -bytes, read them back, then abort the connection with RST")
	send := fs.String("send", "", "with -expect-reset: the bytes to send")
	expectReset := fs.Bool("expect-reset", false, "send -send, read its echo, then require the server's abort (ECONNRESET) rather than EOF")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *reset || *expectReset {
		return abortTrip(*addr, *size, *send, *expectReset, *timeout)
	}
	var wg sync.WaitGroup
	errs := make(chan error, *conns)
	start := time.Now()
	for i := range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := tripOptions{hold: *hold, timeout: *timeout, pace: *pace, halfClose: !*noHalfClose}
			if err := roundTrip(*addr, uint64(i), *size, o); err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		if failed <= 5 {
			fmt.Fprintln(os.Stderr, "echo:", err)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d connections failed", failed, *conns)
	}
	el := time.Since(start)
	fmt.Printf("ok conns=%d bytes=%d elapsed=%s\n", *conns, *size, el.Round(time.Millisecond))
	return nil
}

type tripOptions struct {
	hold, timeout, pace time.Duration
	halfClose           bool
}

// roundTrip sends size pseudo-random bytes (seeded by id), half-closes, and
// checks that exactly the same bytes come back before EOF. Without
// halfClose it reads back exactly size bytes instead of waiting for EOF.
func roundTrip(addr string, id uint64, size int64, o tripOptions) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if o.hold > 0 {
		time.Sleep(o.hold)
	}
	c.SetDeadline(time.Now().Add(o.timeout))
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		var src io.Reader = io.LimitReader(&prng{r: rand.New(rand.NewPCG(id, 42))}, size)
		if o.pace > 0 {
			src = &pacedReader{r: src, total: size, over: o.pace, start: time.Now()}
		}
		_, err := io.Copy(io.MultiWriter(c, sent), src)
		if err == nil && o.halfClose {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got := sha256.New()
	var n int64
	var rerr error
	if o.halfClose {
		n, rerr = io.Copy(got, c)
	} else {
		n, rerr = io.CopyN(got, c, size)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("receive after %d bytes: %w", n, rerr)
	}
	if n != size {
		return fmt.Errorf("received %d bytes, sent %d", n, size)
	}
	if s, g := hex.EncodeToString(sent.Sum(nil)), hex.EncodeToString(got.Sum(nil)); s != g {
		return fmt.Errorf("checksum mismatch: sent %s received %s", s, g)
	}
	return nil
}

// abortTrip tests that aborts cross the proxy. With expectReset it sends
// payload, reads its echo and then requires ECONNRESET (a clean EOF means a
// proxy turned the server's abort into a normal end). Otherwise it sends
// size bytes, reads them back (so they crossed), and resets the connection.
func abortTrip(addr string, size int64, payload string, expectReset bool, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	msg := []byte(payload)
	if !expectReset {
		msg = make([]byte, size)
		(&prng{r: rand.New(rand.NewPCG(7, 42))}).Read(msg)
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		return fmt.Errorf("echo of %d bytes: %w", len(msg), err)
	}
	if !expectReset {
		c.(*net.TCPConn).SetLinger(0)
		fmt.Printf("reset sent after %d bytes\n", len(msg))
		return nil
	}
	if _, err := c.Write([]byte("!")); err != nil { // the echo arrived: abort now
		return fmt.Errorf("send: %w", err)
	}
	_, err = io.Copy(io.Discard, c)
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		fmt.Println("got reset")
		return nil
	case err == nil:
		return errors.New("clean EOF where the server aborted: the reset was lost on the way")
	}
	return fmt.Errorf("after the echo: %w (want ECONNRESET)", err)
}

// readCounter counts what is read through it.
type readCounter struct {
	r io.Reader
	n *int64
}

func (r readCounter) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	*r.n += int64(n)
	return n, err
}

// prng is an io.Reader of deterministic pseudo-random bytes.
type prng struct{ r *rand.Rand }

func (p *prng) Read(b []byte) (int, error) {
	for i := 0; i < len(b); i += 8 {
		v := p.r.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return len(b), nil
}

// pacedReader releases total bytes of r evenly over the duration over.
type pacedReader struct {
	r     io.Reader
	total int64
	over  time.Duration
	start time.Time
	done  int64
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.done >= p.total {
		return p.r.Read(b) // all released: let r report its EOF
	}
	for {
		due := p.total
		if el := time.Since(p.start); el < p.over {
			due = int64(float64(p.total) * float64(el) / float64(p.over))
		}
		if allowed := due - p.done; allowed > 0 || p.done >= p.total {
			if allowed > 0 && int64(len(b)) > allowed {
				b = b[:allowed]
			}
			n, err := p.r.Read(b)
			p.done += int64(n)
			return n, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
