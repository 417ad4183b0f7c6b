package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/ferrymesh/ferry/proxy/tunnel"
	"github.com/hashicorp/go-hclog"
)

// Tunnel sessions over kernel TLS (KTLSTunnelALPN): two sidecars with the
// default configuration (tunnels on, kernel TLS on by policy). Under UML
// the session is in the kernel on both ends; here the handoff is refused
// and both ends carry the same tunnels in user space (fallback).

// replayMaxForTest bounds what a client tunnel copies instead of splicing
// (tunnel's replay copy, 64 KiB, plus a chunk in flight).
const replayMaxForTest = 128 << 10

type ktlsTunnels struct {
	router  *MeshRouter
	in      *Proxy
	inModes *CounterVec
	apps    chan *net.TCPConn
	addr    string
	svc     catalog.Service
}

func startKTLSTunnels(t *testing.T, client, server KTLS) *ktlsTunnels {
	t.Helper()
	return startKTLSTunnelsWith(t, client, server, allowAll(t))
}

func startKTLSTunnelsWith(t *testing.T, client, server KTLS, w *intentions.Watcher) *ktlsTunnels {
	t.Helper()
	ca := mtlstest.NewCA(t)
	inModes := NewTLSModeMetric()
	acc := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256), Intentions: w, Service: "api",
		KTLS: server, TLSModes: inModes}
	acc.Init()
	apps := make(chan *net.TCPConn, 1)
	app := testkit.Serve(t, func(c net.Conn) {
		t.Cleanup(func() { c.Close() })
		apps <- c.(*net.TCPConn)
	})
	p := startProxy(t, Config{Acceptor: acc,
		Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testkit.LogWriter{T: t}})}, app)
	inAddr, _ := p.Addrs()
	r := NewMeshRouter(nil, ca.Identity(t, "web", mtlstest.EC256), nil)
	r.SetKTLS(client)
	t.Cleanup(r.Close)
	k := &ktlsTunnels{router: r, in: p, inModes: inModes, apps: apps, addr: inAddr.String(),
		svc: catalog.Service{Name: "api", Datacenter: ca.Datacenter}}
	return k
}

// connect carries one app connection through both sidecars (a tunnel).
func (k *ktlsTunnels) connect(t *testing.T, svc catalog.Service) (clientApp, serverApp *net.TCPConn, out *pumpRun) {
	clientApp, serverApp, out, _ = k.connectTunnel(t, svc)
	return clientApp, serverApp, out
}

func (k *ktlsTunnels) connectTunnel(t *testing.T, svc catalog.Service) (clientApp, serverApp *net.TCPConn, out *pumpRun, tun *tunnel.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := k.router.clientConfig(svc)
	up, err := k.router.dialTLS(ctx, k.addr, cfg, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tun = tunnelUnderConn(up); tun == nil {
		t.Fatalf("the connection is not a tunnel: %T", up)
	}
	clientApp, a := testkit.TCPPair(t)
	out = startPump(t, context.Background(), a, trackedLike{up}, time.Minute)
	select {
	case serverApp = <-k.apps:
	case <-time.After(10 * time.Second):
		t.Fatal("the server sidecar did not connect the app")
	}
	return clientApp, serverApp, out, tun
}

func tunnelUnderConn(c net.Conn) *tunnel.Conn {
	t, _ := c.(*tunnel.Conn)
	return t
}

// The default configuration between two ferry sidecars: several app
// connections one after another over one tunnel session that both ends
// agreed to hand to the kernel. Bulk data each way checksummed (64 MiB
// under UML), half-close both ways in order, session reuse, and at the
// end an app's reset crossing as a reset (which ends the session).
func TestKTLSTunnels(t *testing.T) {
	testkit.CheckLeaks(t)
	on := KTLS{Use: true}
	k := startKTLSTunnels(t, on, on)
	svc := k.svc
	want := agreedMode(t)
	check := func(t *testing.T, out *pumpRun, sent, received int64) {
		t.Helper()
		if st := out.Wait(t, 30*time.Second); st.Err != nil || st.Sent != sent || st.Received != received {
			t.Errorf("client sidecar pump: %+v", st)
		}
	}

	// 1: bulk both ways, each half-closed after its stream.
	c, s, out, tun := k.connectTunnel(t, svc)
	cpu0, wall0 := processCPU(), time.Now()
	testkit.ExchangeBothWays(t, c, s, streamSize())
	gb := float64(2*streamSize()) / 1e9
	t.Logf("tunnel, %s: %.1f CPU-s/GB, %.1f s/GB wall (both apps and both sidecars, one process)",
		want, (processCPU()-cpu0).Seconds()/gb, time.Since(wall0).Seconds()/gb)
	check(t, out, streamSize(), streamSize())
	// In the kernel the client sidecar's tunnel splices the payloads both
	// ways (frame-aware splice): all but the replay copy's first chunks
	// (64 KiB at most, before the server's first frame).
	spliced := tun.Spliced()
	t.Logf("client sidecar's tunnel spliced %d of %d payload bytes", spliced, 2*streamSize())
	if want == tlsModeKernel && spliced < 2*streamSize()-2*replayMaxForTest {
		t.Errorf("spliced %d of %d bytes; want the payload spliced", spliced, 2*streamSize())
	}
	if want != tlsModeKernel && spliced != 0 {
		t.Errorf("spliced %d bytes over a user-space session", spliced)
	}

	// 2: half-close in order: the request's end reaches the server app,
	// which still answers; then the answer's end.
	c, s, out = k.connect(t, svc)
	if _, err := c.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if got, err := testkit.ReadAllTimeout(t, s, 5*time.Second); err != nil || string(got) != "request" {
		t.Fatalf("server app read %q, %v; want the request, then a clean EOF", got, err)
	}
	if _, err := s.Write([]byte("response")); err != nil {
		t.Fatalf("the server app cannot answer after the client's half-close: %v", err)
	}
	s.CloseWrite()
	if got, err := testkit.ReadAllTimeout(t, c, 5*time.Second); err != nil || string(got) != "response" {
		t.Fatalf("client app read %q, %v; want the response, then a clean EOF", got, err)
	}
	check(t, out, int64(len("request")), int64(len("response")))

	// 3: the server half-closes first, then the client; bulk again.
	c, s, out = k.connect(t, svc)
	if _, err := io.Copy(s, &testkit.PatternReader{N: 1 << 20, Seed: 3}); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	testkit.CheckPattern(t, c, 1<<20, 3)
	if _, err := c.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if got, err := testkit.ReadAllTimeout(t, s, 5*time.Second); err != nil || string(got) != "late" {
		t.Fatalf("server app read %q, %v after its own half-close", got, err)
	}
	if st := out.Wait(t, 10*time.Second); st.Err != nil {
		t.Errorf("client sidecar pump: %+v", st)
	}

	if n, r := k.router.tunnels.With("new").Value(), k.router.tunnels.With("reused").Value(); n != 1 || r != 2 {
		t.Errorf("tunnels: %d on new sessions, %d reused; want 1 and 2", n, r)
	}
	for _, m := range []string{tlsModeKernel, tlsModeUser, tlsModeFallback} {
		in, o := k.inModes.With("inbound", m).Value(), k.router.TLSModeMetric().With("outbound", m).Value()
		if m == want && (in != 1 || o != 1) || m != want && (in != 0 || o != 0) {
			t.Errorf("mode %s: inbound %d, outbound %d sessions; want both %d", m, in, o, map[bool]int{true: 1}[m == want])
		}
	}
	t.Logf("3 tunnels over one session, counted %s on both sidecars", want)

	// 4: a reset crosses as a reset, on the same session.
	c, s, out = k.connect(t, svc)
	if _, err := c.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(s, make([]byte, 7)); err != nil {
		t.Fatalf("data before the reset: %v", err)
	}
	c.SetLinger(0)
	c.Close()
	if err := readUntilErr(t, s, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server app read %v after the client app's reset; want ECONNRESET", err)
	}
	if st := out.Wait(t, 5*time.Second); st.Err == nil {
		t.Errorf("client sidecar pump ended without an error: %+v", st)
	}
	if r := k.router.tunnels.With("reused").Value(); r != 3 {
		t.Errorf("tunnels reused %d; want 3", r)
	}

	// 5: the reset ended that session; the next connection gets a new one
	// (counted), and the server app's reset crosses the other way.
	c, s, out = k.connect(t, svc)
	if _, err := s.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 7)); err != nil {
		t.Fatalf("data before the reset: %v", err)
	}
	s.SetLinger(0)
	s.Close()
	if err := readUntilErr(t, c, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client app read %v after the server app's reset; want ECONNRESET", err)
	}
	out.Wait(t, 5*time.Second)
	if n := k.router.tunnels.With("new").Value(); n != 2 {
		t.Errorf("tunnels on new sessions %d; want 2", n)
	}
	if o := k.router.TLSModeMetric().With("outbound", want).Value(); o != 2 {
		t.Errorf("outbound %s sessions %d; want 2", want, o)
	}
}

// Either end with -ktls=off: the tunnel session stays in user space
// (tunnel.ALPN) on both, and tunnels work as before.
func TestKTLSTunnelsOneEndOff(t *testing.T) {
	on := KTLS{Use: true}
	for _, tc := range []struct {
		name           string
		client, server KTLS
	}{{"client off", KTLS{}, on}, {"server off", on, KTLS{}}} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			k := startKTLSTunnels(t, tc.client, tc.server)
			svc := k.svc
			for range 2 {
				c, s, out := k.connect(t, svc)
				testkit.ExchangeBothWays(t, c, s, 1<<20)
				if st := out.Wait(t, 10*time.Second); st.Err != nil {
					t.Errorf("client sidecar pump: %+v", st)
				}
			}
			if r := k.router.tunnels.With("reused").Value(); r != 1 {
				t.Errorf("tunnels reused %d; want 1", r)
			}
			if in, o := k.inModes.With("inbound", tlsModeUser).Value(), k.router.TLSModeMetric().With("outbound", tlsModeUser).Value(); in != 1 || o != 1 {
				t.Errorf("user-space sessions: inbound %d, outbound %d; want 1 and 1", in, o)
			}
		})
	}
}

// An intention that starts denying the source closes the kernel tunnel
// session under the pump (the server's revocation closes the socket): the
// client app, mid-stream, reads a reset.
func TestKTLSTunnelRevocation(t *testing.T) {
	testkit.CheckLeaks(t)
	deny := make(chan struct{})
	fetch := func(ctx context.Context, index uint64) (intentions.Snapshot, error) {
		switch index {
		case 0:
			return intentions.Snapshot{Index: 1, DefaultAllow: true}, nil
		case 1:
			select {
			case <-deny:
				return intentions.Snapshot{Index: 2, DefaultAllow: false}, nil
			case <-ctx.Done():
			}
		default:
			<-ctx.Done()
		}
		return intentions.Snapshot{}, ctx.Err()
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w, err := intentions.Watch(ctx, intentions.Config{Destination: "api", Fetch: fetch})
	if err != nil {
		t.Fatal(err)
	}
	k := startKTLSTunnelsWith(t, KTLS{Use: true}, KTLS{Use: true}, w)
	c, s, _ := k.connect(t, k.svc)
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(s, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	close(deny)
	if err := readUntilErr(t, c, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client app read %v after the revocation; want ECONNRESET", err)
	}
	testkit.Eventually(t, "revoked counted", func() bool { return counter(k.in, "inbound", "revoked") == 1 })
	if m := agreedMode(t); k.inModes.With("inbound", m).Value() != 1 {
		t.Errorf("inbound %s sessions %d, want 1", m, k.inModes.With("inbound", m).Value())
	}
}

// The server sidecar's drain deadline cuts a kernel tunnel session with a
// tunnel in flight as an abort: the client app reads a reset, never a
// clean end.
func TestKTLSTunnelDrainDeadlineResets(t *testing.T) {
	testkit.CheckLeaks(t)
	k := startKTLSTunnels(t, KTLS{Use: true}, KTLS{Use: true})
	c, s, _ := k.connect(t, k.svc)
	if _, err := s.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 7)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	k.in.Shutdown(ctx)
	if err := readUntilErr(t, c, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client app read %v after the drain deadline; want ECONNRESET", err)
	}
}

// -ktls=required with tunnels on: the kernel tunnel session is the only
// one taken. Between two such sidecars tunnels work where the kernel can
// (UML); here the handoff falls back and both ends refuse. A user-space
// client (kTLS off, offering only ferry/1) is refused by the server.
func TestKTLSTunnelsRequired(t *testing.T) {
	req := KTLS{Use: true, Required: true}
	t.Run("both required", func(t *testing.T) {
		testkit.CheckLeaks(t)
		k := startKTLSTunnels(t, req, req)
		if agreedMode(t) != tlsModeKernel {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := k.router.dialTLS(ctx, k.addr, k.router.clientConfig(k.svc), false, nil)
			if err == nil || !strings.Contains(err.Error(), "-ktls=required") {
				t.Fatalf("dial: %v; want refused as not in the kernel", err)
			}
			return
		}
		for range 2 {
			c, s, out := k.connect(t, k.svc)
			testkit.ExchangeBothWays(t, c, s, 1<<20)
			if st := out.Wait(t, 10*time.Second); st.Err != nil {
				t.Errorf("client sidecar pump: %+v", st)
			}
		}
		if in, o := k.inModes.With("inbound", tlsModeKernel).Value(), k.router.TLSModeMetric().With("outbound", tlsModeKernel).Value(); in != 1 || o != 1 {
			t.Errorf("kernel sessions: inbound %d, outbound %d; want 1 and 1", in, o)
		}
		if r := k.router.tunnels.With("reused").Value(); r != 1 {
			t.Errorf("tunnels reused %d; want 1", r)
		}
		t.Logf("required with tunnels: tunnels over kernel sessions")
	})
	t.Run("user-space client", func(t *testing.T) {
		testkit.CheckLeaks(t)
		k := startKTLSTunnels(t, KTLS{}, req)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		up, err := k.router.dialTLS(ctx, k.addr, k.router.clientConfig(k.svc), false, nil)
		if err != nil {
			t.Fatal(err) // the handshake completes; the server refuses after it
		}
		defer up.Close()
		testkit.Eventually(t, "refused", func() bool { return counter(k.in, "inbound", "handshake_error") == 1 })
		if got := k.inModes.With("inbound", tlsModeUser).Value(); got != 1 {
			t.Errorf("inbound user-space sessions %d, want 1 (counted, then refused)", got)
		}
	})
}
