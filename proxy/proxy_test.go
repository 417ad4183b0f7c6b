package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/hashicorp/go-hclog"
)

// startProxy applies loopback endpoints (ephemeral ports) and closes the
// proxy at cleanup.
func startProxy(t *testing.T, cfg Config, app string) *Proxy {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Debug, Output: testkit.LogWriter{T: t}})
	}
	p := New(cfg)
	if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: app}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// exchange dials addr, sends msg, half-closes and returns the whole reply.
func exchange(t *testing.T, addr, msg string) (string, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	// A reset can arrive before the write: the write then reports it and
	// the read sees a plain EOF, so the write's error counts too.
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite() // after a reset: ENOTCONN; the read reports the reset
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func counter(p *Proxy, dir, outcome string) int64 {
	return p.Metrics().Connections.With(dir, outcome).Value()
}

func TestInboundForwardsToLocalApp(t *testing.T) {
	testkit.CheckLeaks(t)
	app := testkit.EchoServer(t)
	p := startProxy(t, Config{}, app)
	in, _ := p.Addrs()
	for range 3 {
		got, err := exchange(t, in.String(), "hello app")
		if err != nil || got != "hello app" {
			t.Fatalf("echo through inbound: %q, %v", got, err)
		}
	}
	testkit.Eventually(t, "3 ok inbound connections", func() bool { return counter(p, "inbound", "ok") == 3 })
	m := p.Metrics()
	if s, r := m.SentBytes.With("inbound").Value(), m.ReceivedBytes.With("inbound").Value(); s != 27 || r != 27 {
		t.Fatalf("bytes sent %d received %d, want 27/27", s, r)
	}
	if m.Active.With("inbound").Value() != 0 || p.Registry().Len() != 0 {
		t.Fatal("connections still tracked after they ended")
	}
	if m.Duration.With("inbound").Count() != 3 {
		t.Fatal("durations not observed")
	}
}

// A connection made straight to the outbound port (not redirected) must be
// refused: passing it through would dial the listener itself.
func TestOutboundRefusesNonRedirected(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	_, out := p.Addrs()
	_, err := exchange(t, out.String(), "loop?")
	if err == nil || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("direct connection to outbound: %v, want reset", err)
	}
	testkit.Eventually(t, "loop counted", func() bool { return counter(p, "outbound", "loop") == 1 })
}

func TestInboundDialErrorResets(t *testing.T) {
	testkit.CheckLeaks(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close() // nothing listens here now
	p := startProxy(t, Config{ConnectTimeout: time.Second}, dead)
	in, _ := p.Addrs()
	if _, err := exchange(t, in.String(), "x"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("app down: %v, want reset", err)
	}
	testkit.Eventually(t, "dial error counted", func() bool {
		return counter(p, "inbound", "dial_error") == 1 && p.Metrics().DialErrors.With("inbound").Value() == 1
	})
}

// The Acceptor hook decides what is pumped and under which keys; the
// registry closes live connections by key (live revocation).
func TestAcceptorHookAndRevocation(t *testing.T) {
	testkit.CheckLeaks(t)
	app := testkit.EchoServer(t)
	acc := AcceptorFunc(func(ctx context.Context, raw *net.TCPConn) (Accepted, error) {
		// A toy "handshake": the first line names the peer.
		buf := make([]byte, 4)
		if _, err := io.ReadFull(raw, buf); err != nil {
			return Accepted{}, err
		}
		peer := string(buf)
		if peer == "evil" {
			return Accepted{}, &Refused{Outcome: "denied", Reason: "test intention", Reset: true}
		}
		return Accepted{Conn: raw, Peer: "spiffe://test/svc/" + peer, Keys: []string{"src:" + peer}}, nil
	})
	p := startProxy(t, Config{Acceptor: acc}, app)
	in, _ := p.Addrs()

	if _, err := exchange(t, in.String(), "evil and more"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("refused peer: %v, want reset", err)
	}
	testkit.Eventually(t, "denied counted", func() bool { return counter(p, "inbound", "denied") == 1 })

	// Two live connections from "web", one from "api".
	open := func(peer string) net.Conn {
		c, err := net.Dial("tcp", in.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte(peer + "ping"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatal(err)
		}
		return c
	}
	web1, web2, api := open("web_"), open("web_"), open("api_")
	testkit.Eventually(t, "3 tracked", func() bool { return p.Registry().Len() == 3 })
	for _, ci := range p.Registry().Snapshot() {
		if ci.Direction != Inbound || !strings.HasPrefix(ci.Peer, "spiffe://test/svc/") {
			t.Fatalf("conn info %+v", ci)
		}
	}
	if n := p.Registry().CloseKey("src:web_", nil); n != 2 {
		t.Fatalf("CloseKey closed %d, want 2", n)
	}
	for _, c := range []net.Conn{web1, web2} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !testkit.IsClosedOrReset(err) {
			t.Fatalf("revoked conn: %v", err)
		}
	}
	testkit.Eventually(t, "revoked counted", func() bool { return counter(p, "inbound", "closed") == 2 })
	// The other source is untouched.
	api.Write([]byte("still here"))
	if _, err := io.ReadFull(api, make([]byte, 10)); err != nil {
		t.Fatalf("unrevoked connection broken: %v", err)
	}
}

func TestMaxConnectionsResetsExtra(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{MaxConnections: 1}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	held, err := net.Dial("tcp", in.String())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	held.Write([]byte("x"))
	held.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadFull(held, make([]byte, 1)) // now surely being pumped
	if _, err := exchange(t, in.String(), "y"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("over the cap: %v, want reset", err)
	}
	testkit.Eventually(t, "over_limit counted", func() bool { return counter(p, "inbound", "over_limit") == 1 })
}

// openEchoed connects to addr, sends msg and reads it back: a connection
// established end to end through the proxy, closed when the test ends.
func openEchoed(t *testing.T, addr, msg string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatalf("echo of %q: %v", msg, err)
	}
	return c // the 5 s read deadline stays: it bounds the test's later reads
}

// Drain: after Shutdown starts, /ready is 503, new connections are refused,
// and an established one finishes its exchange.
func TestShutdownDrains(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	c := openEchoed(t, in.String(), "before")

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- p.Shutdown(ctx)
	}()
	testkit.Eventually(t, "not ready", func() bool { return p.Ready() != nil })
	if err := p.Ready(); !strings.Contains(err.Error(), "draining") {
		t.Fatalf("Ready during drain: %v", err)
	}
	testkit.Eventually(t, "listener closed", func() bool {
		c2, err := net.Dial("tcp", in.String())
		if err == nil {
			c2.Close()
		}
		return err != nil
	})
	// The established connection still works and ends cleanly.
	c.Write([]byte(" after"))
	c.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != " after" {
		t.Fatalf("during drain: %q, %v", rest, err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last connection ended")
	}
}

func TestShutdownDeadlineClosesConnections(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	c := openEchoed(t, in.String(), "x")

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := p.Shutdown(ctx); err == nil {
		t.Fatal("Shutdown reported a clean drain with a connection still open")
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("Shutdown took %v", el)
	}
	if _, err := io.ReadAll(c); err != nil && !testkit.IsClosedOrReset(err) {
		t.Fatalf("after drain deadline: %v", err)
	}
	if counter(p, "inbound", "closed") != 1 {
		t.Fatalf("closed outcome = %d, want 1", counter(p, "inbound", "closed"))
	}
}

func TestApplyRebindsAndSwitchesApp(t *testing.T) {
	testkit.CheckLeaks(t)
	app1, app2 := testkit.EchoServer(t), testkit.PrefixServer(t, "two:")
	p := startProxy(t, Config{}, app1)
	in, out := p.Addrs()
	if got, _ := exchange(t, in.String(), "a"); got != "a" {
		t.Fatalf("app1: %q", got)
	}
	// Same listeners, new app.
	if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: app2}); err != nil {
		t.Fatal(err)
	}
	if in2, out2 := p.Addrs(); in2.String() != in.String() || out2.String() != out.String() {
		t.Fatal("listeners rebound although their addresses did not change")
	}
	if got, _ := exchange(t, in.String(), "b"); got != "two:b" {
		t.Fatalf("after app switch: %q", got)
	}
	// New inbound address: rebinds, old one stops accepting.
	if err := p.Apply(Endpoints{Inbound: "127.0.0.2:0", Outbound: "127.0.0.1:0", LocalApp: app2}); err != nil {
		t.Fatal(err)
	}
	in3, _ := p.Addrs()
	if got, _ := exchange(t, in3.String(), "c"); got != "two:c" {
		t.Fatalf("new inbound: %q", got)
	}
	if _, err := net.Dial("tcp", in.String()); err == nil {
		t.Fatal("old inbound listener still accepting")
	}
	if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: "no-port"}); err == nil {
		t.Fatal("bad local app accepted")
	}
}

func TestAdmin(t *testing.T) {
	testkit.CheckLeaks(t)
	p := New(Config{})
	t.Cleanup(func() { p.Close() })
	p.AddReadyCheck("identity", func() error { return nil })
	srv := httptest.NewServer(AdminHandler(p.Ready, p.Metrics().Set))
	t.Cleanup(srv.Close)
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/ready"); code != 503 || !strings.Contains(body, "configuration not loaded") {
		t.Fatalf("/ready before config: %d %q", code, body)
	}
	if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: testkit.EchoServer(t)}); err != nil {
		t.Fatal(err)
	}
	if code, body := get("/ready"); code != 200 {
		t.Fatalf("/ready after config: %d %q", code, body)
	}
	identity := errors.New("leaf not loaded")
	p.AddReadyCheck("identity", func() error { return identity })
	if code, body := get("/ready"); code != 503 || !strings.Contains(body, "identity: leaf not loaded") {
		t.Fatalf("/ready with a failing check: %d %q", code, body)
	}
	code, body := get("/metrics")
	for _, want := range []string{
		"# TYPE ferry_connections_total counter",
		`ferry_connections_total{direction="inbound",outcome="ok"} 0`,
		`ferry_active_connections{direction="outbound"} 0`,
		"# TYPE ferry_connection_duration_seconds histogram",
	} {
		if code != 200 || !strings.Contains(body, want) {
			t.Fatalf("/metrics lacks %q:\n%s", want, body)
		}
	}
}

func TestMetricsText(t *testing.T) {
	c := NewCounterVec("x_total", "Help.", "a")
	c.With(`q"u\o`).Add(3)
	h := NewDurationHistogramVec("d_seconds", "Durations.", []float64{0.1, 1})
	h.With().Observe(50 * time.Millisecond)
	h.With().Observe(500 * time.Millisecond)
	h.With().Observe(5 * time.Second)
	var s MetricSet
	s.Register(c)
	s.Register(h)
	var b strings.Builder
	s.WritePrometheus(&b)
	want := `# HELP x_total Help.
# TYPE x_total counter
x_total{a="q\"u\\o"} 3
# HELP d_seconds Durations.
# TYPE d_seconds histogram
d_seconds_bucket{le="0.1"} 1
d_seconds_bucket{le="1"} 2
d_seconds_bucket{le="+Inf"} 3
d_seconds_sum 5.55
d_seconds_count 3
`
	if b.String() != want {
		t.Fatalf("got:\n%s\nwant:\n%s", b.String(), want)
	}
}

// Hooks can be swapped while serving (mTLS and the catalog arrive after the
// registration is read); nil restores the plain defaults.
func TestSetAcceptorAtRuntime(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	if got, err := exchange(t, in.String(), "plain"); got != "plain" {
		t.Fatalf("plain: %q, %v", got, err)
	}
	p.SetAcceptor(AcceptorFunc(func(context.Context, *net.TCPConn) (Accepted, error) {
		return Accepted{}, &Refused{Outcome: "plaintext_refused", Reason: "mTLS required", Reset: true}
	}))
	if _, err := exchange(t, in.String(), "plain"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after SetAcceptor: %v, want reset", err)
	}
	testkit.Eventually(t, "refusal counted", func() bool { return counter(p, "inbound", "plaintext_refused") == 1 })
	p.SetAcceptor(nil)
	if got, err := exchange(t, in.String(), "again"); got != "again" {
		t.Fatalf("after SetAcceptor(nil): %q, %v", got, err)
	}
}

func TestMetricsWithDoesNotAllocate(t *testing.T) {
	m := NewMetrics()
	m.Connections.With("inbound", "ok")
	if n := testing.AllocsPerRun(100, func() { m.Connections.With("inbound", "ok").Inc() }); n != 0 {
		t.Fatalf("With allocates %.0f times per call", n)
	}
}

// blockingDialer never connects; it returns when the dial context ends.
type blockingDialer struct{ deadline chan time.Time }

func (d blockingDialer) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	dl, _ := ctx.Deadline()
	d.deadline <- dl
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestConnectTimeout(t *testing.T) {
	testkit.CheckLeaks(t)
	d := blockingDialer{deadline: make(chan time.Time, 1)}
	p := startProxy(t, Config{ConnectTimeout: 150 * time.Millisecond, Dialer: d}, "localhost:1")
	in, _ := p.Addrs()
	start := time.Now()
	if _, err := exchange(t, in.String(), "x"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("dial timeout: %v, want reset", err)
	}
	if dl := <-d.deadline; dl.Sub(start) > time.Second || dl.IsZero() {
		t.Fatalf("dial deadline %v after start; want the 150 ms connect timeout", dl.Sub(start))
	}
	testkit.Eventually(t, "dial error counted", func() bool { return counter(p, "inbound", "dial_error") == 1 })
}

// keepOpen is an accepted conn whose Close leaves the socket open, as a
// tunnel's does when its session may carry the next connection.
type keepOpen struct{ *net.TCPConn }

func (keepOpen) Close() error { return nil }

// The inbound loop over a session (Accepted.Next): each connection is
// pumped and finished (Done) before Next is asked for the following one; a
// Refused from Next is counted under its outcome and closes the socket;
// Next waiting for more does not hold up a drain.
func TestInboundSessionNext(t *testing.T) {
	for _, tc := range []struct {
		name string
		next func(ctx context.Context) (Accepted, error)
		// check runs after the first connection is through
		check func(t *testing.T, p *Proxy, c net.Conn)
	}{
		{"refused", func(context.Context) (Accepted, error) {
			return Accepted{}, &Refused{Outcome: "denied", Reason: "test"}
		}, func(t *testing.T, p *Proxy, c net.Conn) {
			testkit.Eventually(t, "denied counted", func() bool { return counter(p, "inbound", "denied") == 1 })
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); !testkit.IsClosedOrReset(err) {
				t.Fatalf("session socket after a refused Next: %v, want closed", err)
			}
		}},
		{"waits until drain", func(ctx context.Context) (Accepted, error) {
			<-ctx.Done()
			return Accepted{}, errors.New("draining")
		}, func(t *testing.T, p *Proxy, c net.Conn) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			t0 := time.Now()
			if err := p.Shutdown(ctx); err != nil {
				t.Fatalf("shutdown: %v", err)
			}
			if d := time.Since(t0); d > 2*time.Second {
				t.Fatalf("drain waited %v for a session between connections", d)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			var done atomic.Int32
			acc := AcceptorFunc(func(ctx context.Context, raw *net.TCPConn) (Accepted, error) {
				return Accepted{Conn: keepOpen{raw}, Done: func() { done.Add(1) }, Next: tc.next}, nil
			})
			p := startProxy(t, Config{Acceptor: acc}, testkit.EchoServer(t))
			in, _ := p.Addrs()
			c := testkit.Dial(t, in.String())
			c.Write([]byte("ping"))
			c.(*net.TCPConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if got, err := io.ReadAll(c); err != nil || string(got) != "ping" {
				t.Fatalf("first connection: %q, %v", got, err)
			}
			testkit.Eventually(t, "first connection finished", func() bool {
				return counter(p, "inbound", "ok") == 1 && done.Load() == 1
			})
			tc.check(t, p, c)
		})
	}
}
