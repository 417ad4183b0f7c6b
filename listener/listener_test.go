package listener

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/hashicorp/go-hclog"
)

func TestNextBackoff(t *testing.T) {
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	d := time.Duration(0)
	for i, w := range want {
		d = NextBackoff(d)
		if d != w*time.Millisecond {
			t.Fatalf("step %d: %v, want %v", i, d, w*time.Millisecond)
		}
	}
}

func TestRetryable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "accept", Err: &osSyscallError{syscall.EMFILE}}, true},
		{fmt.Errorf("wrapped: %w", syscall.ENFILE), true},
		{syscall.ECONNABORTED, true},
		{syscall.ENOBUFS, true},
		// accept(2): Linux passes the new socket's pending network errors
		// on to accept; TCP callers should retry them.
		{&net.OpError{Op: "accept", Err: &osSyscallError{syscall.ENETDOWN}}, true},
		{syscall.EPROTO, true},
		{syscall.ENOPROTOOPT, true},
		{syscall.EHOSTDOWN, true},
		{syscall.ENONET, true},
		{syscall.EHOSTUNREACH, true},
		{syscall.EOPNOTSUPP, true},
		{syscall.ENETUNREACH, true},
		{errors.New("something else"), false},
		{syscall.EINVAL, false},
		{syscall.EBADF, false},
	} {
		if got := Retryable(tc.err); got != tc.want {
			t.Errorf("Retryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

type osSyscallError struct{ errno syscall.Errno }

func (e *osSyscallError) Error() string { return "accept4: " + e.errno.Error() }
func (e *osSyscallError) Unwrap() error { return e.errno }

// flakyAcceptor fails the first n accepts with err, then delegates.
type flakyAcceptor struct {
	*net.TCPListener
	mu  sync.Mutex
	n   int
	err error
}

func (f *flakyAcceptor) AcceptTCP() (*net.TCPConn, error) {
	f.mu.Lock()
	if f.n > 0 {
		f.n--
		f.mu.Unlock()
		return nil, f.err
	}
	f.mu.Unlock()
	return f.TCPListener.AcceptTCP()
}

func listen(t *testing.T) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// serve runs l.Serve(h) in the background and stops it at cleanup.
func serve(t *testing.T, l *Listener, h Handler) <-chan error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- l.Serve(h) }()
	t.Cleanup(func() {
		l.Close()
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Close")
		}
		l.Wait(nil)
	})
	return ch
}

func echoOnce(c *net.TCPConn) {
	defer c.Close()
	io.Copy(c, c)
}

func TestServeBacksOffOnTemporaryErrors(t *testing.T) {
	testkit.CheckLeaks(t)
	fa := &flakyAcceptor{TCPListener: listen(t), n: 4, err: &net.OpError{Op: "accept", Err: syscall.EMFILE}}
	var errs atomic.Int32
	l := New(fa, Options{OnAcceptError: func(error) { errs.Add(1) }})
	var mu sync.Mutex
	var slept []time.Duration
	l.sleep = func(d time.Duration) { mu.Lock(); slept = append(slept, d); mu.Unlock() }
	serve(t, l, echoOnce)

	c, err := net.Dial("tcp", fa.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hi"))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); err != nil || string(b) != "hi" {
		t.Fatalf("echo after errors: %q, %v", b, err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []time.Duration{5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond}
	if fmt.Sprint(slept) != fmt.Sprint(want) || errs.Load() != 4 {
		t.Fatalf("backoffs %v (%d errors), want %v", slept, errs.Load(), want)
	}
}

// At the fd limit accept fails again and again; the log gets one line a
// second (with the count left out), not one per failure.
func TestServeAcceptErrorsLoggedOncePerSecond(t *testing.T) {
	testkit.CheckLeaks(t)
	fa := &flakyAcceptor{TCPListener: listen(t), n: 50, err: &net.OpError{Op: "accept", Err: syscall.EMFILE}}
	var buf syncBuf
	l := New(fa, Options{Logger: hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Warn})})
	l.sleep = func(time.Duration) {}
	serve(t, l, echoOnce)
	c, err := net.Dial("tcp", fa.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hi"))
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); err != nil || string(b) != "hi" {
		t.Fatalf("echo after errors: %q, %v", b, err)
	}
	if n := strings.Count(buf.String(), "accept error"); n != 1 {
		t.Fatalf("%d accept error lines for 50 failures within a second, want 1:\n%s", n, buf.String())
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestServeStopsOnPermanentError(t *testing.T) {
	testkit.CheckLeaks(t)
	fa := &flakyAcceptor{TCPListener: listen(t), n: 1, err: syscall.EBADF}
	l := New(fa, Options{})
	defer l.Close()
	ch := make(chan error, 1)
	go func() { ch <- l.Serve(echoOnce) }()
	select {
	case err := <-ch:
		if !errors.Is(err, syscall.EBADF) {
			t.Fatalf("Serve returned %v, want EBADF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve kept going after a permanent error")
	}
}

func TestCloseIsIdempotentAndServeReturnsNil(t *testing.T) {
	testkit.CheckLeaks(t)
	l := New(listen(t), Options{})
	ch := make(chan error, 1)
	go func() { ch <- l.Serve(echoOnce) }()
	time.Sleep(10 * time.Millisecond) // let it block in accept; either order is fine
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := <-ch; err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
}

// Past MaxConns, new connections are reset at once and counted; once a slot
// frees up, connections are served again.
func TestConnectionCap(t *testing.T) {
	testkit.CheckLeaks(t)
	ln := listen(t)
	var over atomic.Int32
	l := New(ln, Options{MaxConns: 2, OnOverLimit: func() { over.Add(1) }})
	release := make(chan struct{})
	started := make(chan struct{}, 10)
	serve(t, l, func(c *net.TCPConn) {
		defer c.Close()
		started <- struct{}{}
		<-release
		c.Write([]byte("served"))
	})
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})

	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	held := []net.Conn{dial(), dial()}
	for range held {
		<-started
	}
	if l.Active() != 2 {
		t.Fatalf("Active = %d, want 2", l.Active())
	}
	// The reset may beat Dial's own completion check; both are a reset.
	extra, err := net.Dial("tcp", ln.Addr().String())
	if err == nil {
		defer extra.Close()
		extra.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = extra.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection past the cap: %v, want connection reset", err)
	}
	if over.Load() != 1 {
		t.Fatalf("OnOverLimit called %d times, want 1", over.Load())
	}

	close(release)
	for _, c := range held {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, _ := io.ReadAll(c); string(b) != "served" {
			t.Fatalf("held connection got %q", b)
		}
	}
	timeout := make(chan struct{})
	time.AfterFunc(5*time.Second, func() { close(timeout) })
	if !l.Wait(timeout) {
		t.Fatal("handlers did not finish")
	}
	// A slot is free again: served, not reset.
	c := dial()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); string(b) != "served" {
		t.Fatalf("after the cap cleared: %q, %v", b, err)
	}
}

func TestOriginalDstNotRedirected(t *testing.T) {
	ln := listen(t)
	got := make(chan *net.TCPConn, 1)
	go func() {
		c, _ := ln.AcceptTCP()
		got <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc := <-got
	defer sc.Close()
	dst, err := OriginalDst(sc)
	// Depending on whether conntrack tracks loopback here, the kernel
	// reports ENOENT or the untranslated destination (the listener).
	if err != nil && !errors.Is(err, ErrNoOriginalDst) {
		t.Fatalf("OriginalDst: %v", err)
	}
	if err == nil && dst != sc.LocalAddr().(*net.TCPAddr).AddrPort() {
		t.Fatalf("OriginalDst = %v for an untranslated connection to %v", dst, sc.LocalAddr())
	}
}

func TestOriginalDstNil(t *testing.T) {
	if _, err := OriginalDst(nil); err == nil {
		t.Fatal("no error for nil conn")
	}
}
