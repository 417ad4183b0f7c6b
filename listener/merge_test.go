package listener

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

func listenOn(t *testing.T, addr string) *net.TCPListener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("listen %s: %v", addr, err)
	}
	return l.(*net.TCPListener)
}

// TestMergeAcceptsFromEverySocket: a connection to either socket comes out
// of the one AcceptTCP, with its own local address (the family the
// redirect rule chose).
func TestMergeAcceptsFromEverySocket(t *testing.T) {
	testkit.CheckLeaks(t)
	a := listenOn(t, "127.0.0.1:0")
	b := listenOn(t, "[::1]:0")
	m := Merge(a, b)
	t.Cleanup(func() { m.Close() })
	if m.Addr().String() != a.Addr().String() {
		t.Fatalf("Addr = %v, want the first socket's %v", m.Addr(), a.Addr())
	}
	if got := Addrs(m); len(got) != 2 || got[1].String() != b.Addr().String() {
		t.Fatalf("Addrs = %v", got)
	}
	for _, ln := range []*net.TCPListener{b, a, b} {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := m.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		if s.LocalAddr().String() != ln.Addr().String() {
			t.Errorf("accepted on %v, dialled %v", s.LocalAddr(), ln.Addr())
		}
		s.Close()
		c.Close()
	}
}

// TestMergeClose: Close unblocks AcceptTCP with net.ErrClosed, closes every
// socket (new connections are refused) and leaves no goroutine behind.
func TestMergeClose(t *testing.T) {
	testkit.CheckLeaks(t)
	a := listenOn(t, "127.0.0.1:0")
	b := listenOn(t, "[::1]:0")
	m := Merge(a, b)
	errc := make(chan error, 1)
	go func() {
		_, err := m.AcceptTCP()
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("AcceptTCP after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("AcceptTCP still blocked after Close")
	}
	for _, ln := range []*net.TCPListener{a, b} {
		if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			c.Close()
			t.Errorf("%v still accepts after Close", ln.Addr())
		}
	}
}

// TestMergeErrorReachesServe: a fatal accept error of one socket stops the
// merged listener's Serve, as it would a single socket's.
func TestMergeErrorReachesServe(t *testing.T) {
	testkit.CheckLeaks(t)
	a := listenOn(t, "127.0.0.1:0")
	bad := &failingAcceptor{err: syscall.EINVAL, addr: a.Addr()}
	l := New(Merge(a, bad), Options{})
	t.Cleanup(func() { l.Close() })
	err := l.Serve(func(c *net.TCPConn) { c.Close() })
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Serve = %v, want EINVAL", err)
	}
}

type failingAcceptor struct {
	err  error
	addr net.Addr
}

func (f *failingAcceptor) AcceptTCP() (*net.TCPConn, error) { return nil, f.err }
func (f *failingAcceptor) Close() error                     { return nil }
func (f *failingAcceptor) Addr() net.Addr                   { return f.addr }
