package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/listener"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/hashicorp/go-hclog"
)

// allowAll is an intentions watcher that allows every source.
func allowAll(t *testing.T) *intentions.Watcher {
	t.Helper()
	fetch := func(ctx context.Context, index uint64) (intentions.Snapshot, error) {
		if index == 0 {
			return intentions.Snapshot{Index: 1, DefaultAllow: true}, nil
		}
		<-ctx.Done()
		return intentions.Snapshot{}, ctx.Err()
	}
	w, err := intentions.Watch(context.Background(), intentions.Config{Destination: "db", Fetch: fetch})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	select {
	case <-w.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("intentions not loaded")
	}
	return w
}

// raiseNoFile lifts the soft fd limit to at least n (up to the hard limit).
func raiseNoFile(t *testing.T, n uint64) {
	t.Helper()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	if rl.Cur >= n {
		return
	}
	if rl.Max < n {
		t.Skipf("RLIMIT_NOFILE hard limit %d < %d", rl.Max, n)
	}
	old := rl
	rl.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// A thousand silent sockets on the inbound port, from many source
// addresses, do not keep a valid mTLS client out (audit F6): they only
// compete for the pending-handshake budget, where the oldest is reset,
// while -max-connections counts established connections.
func TestInboundSilentSocketsDoNotLockOutClients(t *testing.T) {
	testkit.CheckLeaks(t)
	raiseNoFile(t, 4096)
	ca := mtlstest.NewCA(t)
	acc := &MeshAcceptor{Identity: ca.Identity(t, "db", mtlstest.EC256), Intentions: allowAll(t), Service: "db",
		DisableTunnels: true}
	acc.Init()
	p := startProxy(t, Config{Acceptor: acc, MaxConnections: 64,
		Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testkit.LogWriter{T: t}})}, testkit.EchoServer(t))
	in, _ := p.Addrs()

	const silent = 1000
	var socks []net.Conn
	t.Cleanup(func() {
		for _, c := range socks {
			c.Close()
		}
	})
	for i := range silent {
		// 40 sources (127.0.0.2-41), 25 sockets each.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%40))}}
		c, err := d.Dial("tcp", in.String())
		if err != nil {
			continue // reset already (it would be without the pending budget)
		}
		socks = append(socks, c)
	}
	// The proxy has seen them all: reset (counted), or being handled.
	testkit.Eventually(t, "silent sockets accepted", func() bool {
		return counter(p, "inbound", "pending_limit")+counter(p, "inbound", "over_limit")+
			int64(p.inboundListener().Active()) >= silent
	})

	client := ca.Identity(t, "web", mtlstest.EC256).ClientConfig(ca.ID("db"))
	for i := range 3 {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", in.String(), client)
		if err != nil {
			t.Fatalf("valid client %d while %d silent sockets are open: %v (over_limit=%d, pending_limit=%d)", i, silent, err,
				counter(p, "inbound", "over_limit"), counter(p, "inbound", "pending_limit"))
		}
		msg := fmt.Sprintf("hello %d", i)
		c.Write([]byte(msg))
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != msg {
			t.Fatalf("valid client %d: %q, %v", i, got, err)
		}
	}
	if n := p.inboundListener().Pending(); n > p.cfg.MaxPendingHandshakes {
		t.Fatalf("%d pending, budget %d", n, p.cfg.MaxPendingHandshakes)
	}
	if counter(p, "inbound", "pending_limit") == 0 {
		t.Fatal("no pending_limit resets counted")
	}
}

func (p *Proxy) inboundListener() *listener.Listener {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inbound
}

// scriptedAcceptor fails AcceptTCP with errs, in order, then accepts.
type scriptedAcceptor struct {
	*net.TCPListener
	mu   sync.Mutex
	errs []error
}

func (s *scriptedAcceptor) AcceptTCP() (*net.TCPConn, error) {
	s.mu.Lock()
	if len(s.errs) > 0 {
		err := s.errs[0]
		s.errs = s.errs[1:]
		s.mu.Unlock()
		return nil, err
	}
	s.mu.Unlock()
	return s.TCPListener.AcceptTCP()
}

// Errors accept(2) says to retry do not stop a listener; an error that
// does stop it turns Ready into an error naming the listener (audit F12).
func TestAcceptErrorsAndReadiness(t *testing.T) {
	acceptErr := func(e syscall.Errno) error {
		return &net.OpError{Op: "accept", Net: "tcp", Err: &accept4Error{e}}
	}
	for _, tc := range []struct {
		name      string
		errs      []error
		wantReady bool
	}{
		{"retryable network errors", []error{acceptErr(syscall.ENETDOWN), acceptErr(syscall.EHOSTUNREACH),
			acceptErr(syscall.ENETDOWN), acceptErr(syscall.ENONET)}, true},
		{"permanent error", []error{acceptErr(syscall.ENETDOWN), acceptErr(syscall.EINVAL)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			p := New(Config{Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Debug, Output: testkit.LogWriter{T: t}})})
			first := true
			p.listenTCP = func(ctx context.Context, addr string) (listener.TCPAcceptor, error) {
				l, err := listenTCP(ctx, addr)
				if err != nil || !first {
					return l, err
				}
				first = false // the inbound listener
				return &scriptedAcceptor{TCPListener: l.(*net.TCPListener), errs: tc.errs}, nil
			}
			if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: testkit.EchoServer(t)}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			in, _ := p.Addrs()
			if tc.wantReady {
				if got, err := exchange(t, in.String(), "ping"); err != nil || got != "ping" {
					t.Fatalf("after retryable accept errors: %q, %v", got, err)
				}
				if err := p.Ready(); err != nil {
					t.Fatalf("Ready: %v", err)
				}
				if n := p.Metrics().AcceptErrors.With("inbound").Value(); n != int64(len(tc.errs)) {
					t.Fatalf("accept errors counted %d, want %d", n, len(tc.errs))
				}
				return
			}
			testkit.Eventually(t, "Ready to report the stopped listener", func() bool { return p.Ready() != nil })
			err := p.Ready()
			if !strings.Contains(err.Error(), "inbound listener "+in.String()) || !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("Ready: %v, want the inbound listener's EINVAL", err)
			}
		})
	}
}

type accept4Error struct{ errno syscall.Errno }

func (e *accept4Error) Error() string { return "accept4: " + e.errno.Error() }
func (e *accept4Error) Unwrap() error { return e.errno }

// Upstream listeners removed and added again do not pile up in the list a
// drain waits for (audit F16).
func TestUpstreamRebindDoesNotGrowListenerList(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	reject := func() Route { return Route{Action: Reject, Reason: "test"} }
	for i := range 50 {
		if err := p.SetUpstreams([]Upstream{{Addr: "127.0.0.1:0", Name: "db", Route: reject}}); err != nil {
			t.Fatal(err)
		}
		p.mu.Lock()
		n := len(p.all)
		ln := p.upstreams["127.0.0.1:0"].ln
		p.mu.Unlock()
		if n != 3 {
			t.Fatalf("round %d: %d listeners kept, want 3 (inbound, outbound, upstream)", i, n)
		}
		if err := p.SetUpstreams(nil); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, "removed upstream listener finished", ln.Finished)
	}
}

// Shutdown does not wait past the drain deadline for a permissive inbound
// socket that never sends its first byte (audit F15).
func TestShutdownDoesNotWaitForSilentPermissiveSocket(t *testing.T) {
	testkit.CheckLeaks(t)
	ca := mtlstest.NewCA(t)
	acc := &MeshAcceptor{Identity: ca.Identity(t, "db", mtlstest.EC256), Service: "db", Permissive: true,
		HandshakeTimeout: 20 * time.Second, FirstByteTimeout: 20 * time.Second}
	acc.Init()
	p := startProxy(t, Config{Acceptor: acc}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	testkit.Dial(t, in.String())
	testkit.Eventually(t, "socket pending", func() bool { return p.inboundListener().Pending() == 1 })

	const drain = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	t0 := time.Now()
	p.Shutdown(ctx)
	if d := time.Since(t0); d > drain+2*time.Second {
		t.Fatalf("Shutdown took %v with a %v drain", d, drain)
	}
}

// deadlineLog records read deadlines in the order they were set.
type deadlineLog struct {
	mu      sync.Mutex
	last    time.Time
	expired bool // an expired deadline was set at some point
}

func (d *deadlineLog) SetReadDeadline(t time.Time) error {
	d.mu.Lock()
	d.last = t
	d.expired = d.expired || (!t.IsZero() && t.Before(time.Now()))
	d.mu.Unlock()
	return nil
}

func (d *deadlineLog) get() (last time.Time, expired bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.last, d.expired
}

// A drain that starts just as a tunnel's OPEN is read must not leave its
// expired deadline on the admitted tunnel: expireOnDone's stop waits for a
// callback already under way, so the caller's reset comes last (audit F15).
func TestExpireOnDoneStopWaitsForCallback(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the callback starts at once, racing with stop
	for i := range 500 {
		var d deadlineLog
		stop := expireOnDone(ctx, &d)
		stop()
		d.SetReadDeadline(time.Time{}) // what next() does for an admitted tunnel
		// The callback runs (ctx is done); wait until it has.
		for _, expired := d.get(); !expired; _, expired = d.get() {
			time.Sleep(10 * time.Microsecond)
		}
		if last, _ := d.get(); !last.IsZero() {
			t.Fatalf("round %d: the expired deadline landed after stop returned", i)
		}
	}
}

// gatedConn passes its first Write (a ClientHello) and holds the rest until
// open is closed: a handshake that stays pending on the server.
type gatedConn struct {
	net.Conn
	open   chan struct{}
	writes int
}

func (c *gatedConn) Write(p []byte) (int, error) {
	if c.writes++; c.writes > 1 {
		<-c.open
	}
	return c.Conn.Write(p)
}

// A client sidecar opening many connections at once sends many real
// handshakes from one IP: the per-source budget caps silent sockets only,
// so none of these is reset (the bench's 64-connection mTLS run was, with a
// cap counting every pending handshake).
func TestInboundBurstFromOneSourceIsNotEvicted(t *testing.T) {
	testkit.CheckLeaks(t)
	ca := mtlstest.NewCA(t)
	acc := &MeshAcceptor{Identity: ca.Identity(t, "db", mtlstest.EC256), Intentions: allowAll(t), Service: "db",
		DisableTunnels: true}
	acc.Init()
	p := startProxy(t, Config{Acceptor: acc,
		Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testkit.LogWriter{T: t}})}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	const burst = 3 * DefaultMaxPendingPerSource
	open := make(chan struct{})
	errs := make(chan error, burst)
	client := ca.Identity(t, "web", mtlstest.EC256).ClientConfig(ca.ID("db"))
	for range burst {
		go func() {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 7)}, Timeout: 5 * time.Second}
			raw, err := d.Dial("tcp", in.String())
			if err != nil {
				errs <- err
				return
			}
			c := tls.Client(&gatedConn{Conn: raw, open: open}, client)
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := c.Handshake(); err != nil {
				errs <- err
				return
			}
			c.Write([]byte("x"))
			_, err = io.ReadFull(c, make([]byte, 1))
			errs <- err
		}()
	}
	testkit.Eventually(t, "the whole burst pending at once", func() bool {
		return p.inboundListener().Pending()+int(counter(p, "inbound", "pending_limit")) >= burst
	})
	close(open)
	for range burst {
		if err := <-errs; err != nil {
			t.Errorf("handshake in the burst: %v", err)
		}
	}
	if n := counter(p, "inbound", "pending_limit"); n != 0 {
		t.Fatalf("%d handshakes of one client's burst were reset", n)
	}
}
