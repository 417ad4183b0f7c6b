package listener

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// dialFrom connects to addr from the loopback address src (any 127/8
// address works on Linux) and returns the client end.
func dialFrom(t *testing.T, src, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// wantReset reads c and fails unless the peer reset it.
func wantReset(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: %v, want connection reset", what, err)
	}
}

// stillOpen fails if c was closed or reset by the peer within a short wait.
func stillOpen(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var ne net.Error
	if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: %v, want still open", what, err)
	}
}

// Pending connections have their own budget, per source and in total; past
// it the oldest pending connection is reset, not the new one, and
// established connections do not count against it.
func TestPendingBudgetEvictsOldest(t *testing.T) {
	testkit.CheckLeaks(t)
	ln := listen(t)
	var evicted atomic.Int32
	l := New(ln, Options{MaxConns: 10, MaxPending: 3, MaxPendingPerSource: 2, OnPendingEvicted: func() { evicted.Add(1) }})
	accepted := make(chan *net.TCPConn, 10)
	established := make(chan error, 10)
	release := make(chan struct{})
	serve(t, l, func(c *net.TCPConn) {
		defer c.Close()
		accepted <- c
		// The "handshake": one byte from the client.
		if _, err := c.Read(make([]byte, 1)); err != nil {
			if !l.Evicted(c) {
				t.Errorf("handshake failed but not evicted: %v", err)
			}
			return
		}
		err := l.Established(c)
		established <- err
		if err != nil {
			return
		}
		<-release
	})
	t.Cleanup(func() { close(release) })
	addr := ln.Addr().String()
	next := func() { t.Helper(); <-accepted }

	a1 := dialFrom(t, "127.0.0.2", addr)
	next()
	a2 := dialFrom(t, "127.0.0.2", addr)
	next()
	a3 := dialFrom(t, "127.0.0.2", addr) // third from one source: a1 goes
	next()
	wantReset(t, a1, "oldest of its source")
	if evicted.Load() != 1 {
		t.Fatalf("evicted %d, want 1", evicted.Load())
	}
	b1 := dialFrom(t, "127.0.0.3", addr) // 3 pending: a2, a3, b1
	next()
	stillOpen(t, a2, "a2 with the budget not exceeded")
	b2 := dialFrom(t, "127.0.0.3", addr) // total full: the oldest (a2) goes
	next()
	wantReset(t, a2, "oldest overall")
	if l.Pending() != 3 || evicted.Load() != 2 {
		t.Fatalf("pending %d, evicted %d; want 3, 2", l.Pending(), evicted.Load())
	}
	// Established connections leave the pending budget.
	for _, c := range []*net.TCPConn{a3, b1, b2} {
		c.Write([]byte{1})
		if err := <-established; err != nil {
			t.Fatal(err)
		}
	}
	if l.Pending() != 0 || l.Active() != 3 {
		t.Fatalf("pending %d, active %d; want 0, 3", l.Pending(), l.Active())
	}
	for _, c := range []*net.TCPConn{a3, b1, b2} {
		stillOpen(t, c, "established")
	}
}

// MaxConns counts established connections only: at the cap a new
// connection is refused at accept, and one whose handshake completes past
// it gets ErrOverLimit.
func TestPendingMaxConnsCountsEstablished(t *testing.T) {
	testkit.CheckLeaks(t)
	ln := listen(t)
	var over atomic.Int32
	l := New(ln, Options{MaxConns: 1, MaxPending: 4, OnOverLimit: func() { over.Add(1) }})
	accepted := make(chan struct{}, 10)
	established := make(chan error, 10)
	release := make(chan struct{})
	serve(t, l, func(c *net.TCPConn) {
		defer c.Close()
		accepted <- struct{}{}
		if _, err := c.Read(make([]byte, 1)); err != nil {
			return
		}
		err := l.Established(c)
		established <- err
		if err == nil {
			<-release
		}
	})
	t.Cleanup(func() { close(release) })
	addr := ln.Addr().String()
	// Two pending at once although MaxConns is 1.
	a := dialFrom(t, "127.0.0.1", addr)
	<-accepted
	b := dialFrom(t, "127.0.0.1", addr)
	<-accepted
	a.Write([]byte{1})
	if err := <-established; err != nil {
		t.Fatal(err)
	}
	b.Write([]byte{1})
	if err := <-established; !errors.Is(err, ErrOverLimit) {
		t.Fatalf("second established: %v, want ErrOverLimit", err)
	}
	wantReset(t, b, "established past the cap")
	// At the cap, a new connection is refused at once.
	// The reset may beat Dial's own completion check; both are a reset.
	c, err := net.Dial("tcp", addr)
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("new connection at the cap: %v, want connection reset", err)
	}
	if over.Load() != 2 {
		t.Fatalf("over limit %d, want 2", over.Load())
	}
	stillOpen(t, a, "established")
}

// TestSourceKey: the per-source budget counts a global IPv6 source by its
// /64 (one host owns a whole /64), IPv4 and link-local sources by address.
func TestSourceKey(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"2001:db8:1:2::1", "2001:db8:1:2::"},
		{"2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"},
		{"2001:db8:1:3::1", "2001:db8:1:3::"},
		{"198.18.0.7", "198.18.0.7"},
		{"::ffff:198.18.0.7", "198.18.0.7"},
		{"fe80::1%eth0", "fe80::1"},
		{"fe80::2", "fe80::2"},
		{"::1", "::1"},
		{"fd00:1:2:3::9", "fd00:1:2:3::"},
	} {
		if got := sourceKey(netip.MustParseAddr(tc.a)); got != netip.MustParseAddr(tc.b) {
			t.Errorf("sourceKey(%s) = %s, want %s", tc.a, got, tc.b)
		}
	}
}

// TestPendingPerSourceIPv6Prefix: two IPv6 addresses of one /64 share a
// per-source budget (one host owns the prefix), so a client cannot dodge
// the budget by rotating addresses within its /64.
func TestPendingPerSourceIPv6Prefix(t *testing.T) {
	testkit.CheckLeaks(t)
	ns := testNetns(t,
		[]string{"ip", "-6", "addr", "add", "2001:db8:5::1/64", "dev", "lo", "nodad"},
		[]string{"ip", "-6", "addr", "add", "2001:db8:5::2/64", "dev", "lo", "nodad"},
		[]string{"ip", "-6", "addr", "add", "2001:db8:6::1/64", "dev", "lo", "nodad"})
	var ln *net.TCPListener
	inNetns(t, ns, func() {
		var err error
		ln, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP("2001:db8:5::1")})
		if err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { ln.Close() })
	l := New(ln, Options{MaxPending: 10, MaxPendingPerSource: 1})
	accepted := make(chan struct{}, 10)
	serve(t, l, func(c *net.TCPConn) {
		defer c.Close()
		accepted <- struct{}{}
		c.Read(make([]byte, 1)) // a handshake that never completes
	})
	addr := ln.Addr().String()
	dial := func(src string) *net.TCPConn {
		t.Helper()
		var c *net.TCPConn
		inNetns(t, ns, func() { c = dialFrom(t, src, addr) })
		<-accepted
		return c
	}
	a := dial("2001:db8:5::1")
	other := dial("2001:db8:6::1") // another /64: its own budget
	dial("2001:db8:5::2")          // same /64 as a: a goes
	wantReset(t, a, "the oldest of its /64")
	stillOpen(t, other, "another /64")
}

// The per-source cap counts silent connections only, and the total budget
// evicts a silent connection before one whose client has spoken: a client
// that sent its first bytes is in a real handshake.
func TestPendingEvictsSilentFirst(t *testing.T) {
	testkit.CheckLeaks(t)
	ln := listen(t)
	l := New(ln, Options{MaxPending: 3, MaxPendingPerSource: 1})
	accepted := make(chan *net.TCPConn, 10)
	release := make(chan struct{})
	serve(t, l, func(c *net.TCPConn) {
		defer c.Close()
		accepted <- c
		<-release // never reads: the bytes stay in the kernel's queue
	})
	t.Cleanup(func() { close(release) })
	addr := ln.Addr().String()
	spoke := func(src string) *net.TCPConn {
		t.Helper()
		c := dialFrom(t, src, addr)
		c.Write([]byte{22})
		s := <-accepted
		testkit.Eventually(t, "the byte in the server's queue", func() bool { return !l.silent(&pendingConn{c: s}, time.Now()) })
		return c
	}
	a1 := spoke("127.0.0.2")
	a2 := spoke("127.0.0.2") // over the per-source cap of 1, but neither is silent
	stillOpen(t, a1, "a client that spoke, over its source's cap")
	s1 := dialFrom(t, "127.0.0.2", addr) // pending total 3: a1, a2, s1
	<-accepted
	b1 := spoke("127.0.0.3") // total full: the silent s1 goes, not a1
	wantReset(t, s1, "the silent one, though newer than a1 and a2")
	for _, c := range []*net.TCPConn{a1, a2, b1} {
		stillOpen(t, c, "a client that spoke")
	}
}
