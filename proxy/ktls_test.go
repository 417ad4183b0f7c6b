package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
	"github.com/hashicorp/go-hclog"
)

// These tests run two ferry sidecars in process, an outbound MeshRouter
// dial pumped from a client app and a Proxy with a MeshAcceptor in front
// of a server app, with kernel TLS turned on by policy (KTLS.Use) whatever
// the kernel. On a kernel with the tls module (under UML, test/uml, where
// FERRY_KTLS_REQUIRED is set) the agreed sessions go into the kernel and
// are spliced; here, without it, the same handoff is refused (TCP_ULP:
// ENOENT) and both ends go on in user space, counted as fallback.

// agreedMode is the mode both ends of a session that agreed on kernel TLS
// end up in on this kernel.
func agreedMode(t *testing.T) string {
	t.Helper()
	if err := ktls.Check(); err != nil {
		if os.Getenv("FERRY_KTLS_REQUIRED") != "" {
			t.Fatalf("kernel TLS required: %v", err)
		}
		return tlsModeFallback
	}
	return tlsModeKernel
}

// streamSize is what each direction carries: 64 MiB where the kernel
// does the TLS (the UML suite), less in user space here.
func streamSize() int64 {
	if os.Getenv("FERRY_KTLS_REQUIRED") != "" {
		return 64 << 20
	}
	return 8 << 20
}

type ktlsPair struct {
	clientApp, serverApp *net.TCPConn
	out                  *pumpRun // the client sidecar's pump
	in                   *Proxy   // the server sidecar
	router               *MeshRouter
	inModes              *CounterVec
	up                   net.Conn // the client sidecar's session
}

// startKTLSPair connects a client app through both sidecars to a server
// app and returns both apps' ends. dialErr, when set, receives the
// outbound dial's error instead of failing the test, and the server app is
// not waited for (the server sidecar may refuse).
func startKTLSPair(t *testing.T, client, server KTLS, dialErr *error) *ktlsPair {
	t.Helper()
	return startKTLSPairWith(t, client, server, dialErr, allowAll(t))
}

func startKTLSPairWith(t *testing.T, client, server KTLS, dialErr *error, w *intentions.Watcher) *ktlsPair {
	t.Helper()
	ca := mtlstest.NewCA(t)
	inModes := NewTLSModeMetric()
	acc := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256), Intentions: w, Service: "api",
		KTLS: server, TLSModes: inModes, DisableTunnels: server.Required}
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
	r.DisableTunnels()
	r.SetKTLS(client)
	t.Cleanup(r.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	up, err := r.dialTLS(ctx, inAddr.String(), r.clientConfig(catalog.Service{Name: "api", Datacenter: ca.Datacenter}), false, nil)
	pair := &ktlsPair{in: p, router: r, inModes: inModes}
	if dialErr != nil {
		*dialErr = err
		if err != nil {
			return pair
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	clientApp, a := testkit.TCPPair(t)
	pair.clientApp, pair.up = clientApp, up
	// trackedLike: the catalog's tracked conn sits between the pump and
	// the session, as in a real dial.
	pair.out = startPump(t, context.Background(), a, trackedLike{up}, time.Minute)
	if dialErr != nil {
		return pair
	}
	select {
	case pair.serverApp = <-apps:
	case <-time.After(10 * time.Second):
		t.Fatal("the server sidecar did not connect the app")
	}
	return pair
}

// modes checks the sessions counted by mode on both sidecars.
func (p *ktlsPair) modes(t *testing.T, want string) {
	t.Helper()
	testkit.Eventually(t, "inbound session counted", func() bool { return p.inModes.With("inbound", want).Value() == 1 })
	for _, m := range []string{tlsModeKernel, tlsModeUser, tlsModeFallback} {
		in, out := p.inModes.With("inbound", m).Value(), p.router.TLSModeMetric().With("outbound", m).Value()
		if m == want && (in != 1 || out != 1) || m != want && (in != 0 || out != 0) {
			t.Errorf("mode %s: inbound %d, outbound %d sessions; want both %d", m, in, out, map[bool]int{true: 1}[m == want])
		}
	}
	t.Logf("sessions counted as %s (inbound %d, outbound %d)", want,
		p.inModes.With("inbound", want).Value(), p.router.TLSModeMetric().With("outbound", want).Value())
}

// The data path between two sidecars, kernel TLS agreed or not: 64 MiB
// each way (under UML) checksummed, both half-closes end to end, and the
// sessions counted by mode. One end with -ktls=off means user space on
// both, and nothing else changes.
func TestKTLSTwoSidecars(t *testing.T) {
	on := KTLS{Use: true}
	for _, tc := range []struct {
		name           string
		client, server KTLS
		want           string
	}{
		{"both ends", on, on, agreedMode(t)},
		{"client ktls off", KTLS{}, on, tlsModeUser},
		{"server ktls off", on, KTLS{}, tlsModeUser},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			p := startKTLSPair(t, tc.client, tc.server, nil)
			p.modes(t, tc.want)
			cpu0, wall0 := processCPU(), time.Now()
			testkit.ExchangeBothWays(t, p.clientApp, p.serverApp, streamSize())
			// The whole process: both apps and both sidecars. Under UML
			// (ptrace syscalls, AES-GCM without AES-NI) this says nothing
			// about a real node; it is logged for a rough side by side.
			gb := float64(2*streamSize()) / 1e9
			t.Logf("%s: %.1f CPU-s/GB, %.1f s/GB wall (both apps and both sidecars, one process)",
				tc.want, (processCPU()-cpu0).Seconds()/gb, time.Since(wall0).Seconds()/gb)
			if st := p.out.Wait(t, 30*time.Second); st.Err != nil || st.Sent != streamSize() || st.Received != streamSize() {
				t.Errorf("client sidecar pump: %+v", st)
			}
			testkit.Eventually(t, "inbound connection done", func() bool { return counter(p.in, "inbound", "ok") == 1 })
		})
	}
}

// processCPU is the process's user+system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Half-close crosses a kernel TLS session in order: the client's end of
// stream (close_notify, then FIN, from the client sidecar) reaches the
// server app while the server app still answers, and the answer's end
// reaches the client app.
func TestKTLSHalfCloseInOrder(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startKTLSPair(t, KTLS{Use: true}, KTLS{Use: true}, nil)
	p.modes(t, agreedMode(t))
	if _, err := p.clientApp.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	p.clientApp.CloseWrite()
	got, err := testkit.ReadAllTimeout(t, p.serverApp, 5*time.Second)
	if err != nil || string(got) != "request" {
		t.Fatalf("server app read %q, %v; want the request, then a clean EOF", got, err)
	}
	if _, err := p.serverApp.Write([]byte("response")); err != nil {
		t.Fatalf("the server app cannot answer after the client's half-close: %v", err)
	}
	p.serverApp.CloseWrite()
	got, err = testkit.ReadAllTimeout(t, p.clientApp, 5*time.Second)
	if err != nil || string(got) != "response" {
		t.Fatalf("client app read %q, %v; want the response, then a clean EOF", got, err)
	}
	if st := p.out.Wait(t, 5*time.Second); st.Err != nil {
		t.Errorf("client sidecar pump: %+v", st)
	}
}

// An app's reset crosses a kernel TLS session as a reset, both ways (the
// pump resets the kTLS socket under it, without close_notify).
func TestKTLSResetCrosses(t *testing.T) {
	for _, serverAborts := range []bool{false, true} {
		t.Run(map[bool]string{false: "client app resets", true: "server app resets"}[serverAborts], func(t *testing.T) {
			testkit.CheckLeaks(t)
			p := startKTLSPair(t, KTLS{Use: true}, KTLS{Use: true}, nil)
			p.modes(t, agreedMode(t))
			aborter, other := p.clientApp, p.serverApp
			if serverAborts {
				aborter, other = p.serverApp, p.clientApp
			}
			msg := []byte("partial upload")
			if _, err := aborter.Write(msg); err != nil {
				t.Fatal(err)
			}
			other.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(other, make([]byte, len(msg))); err != nil {
				t.Fatalf("data before the reset: %v", err)
			}
			aborter.SetLinger(0)
			aborter.Close()
			if err := readUntilErr(t, other, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("other app read %v after the reset; want ECONNRESET", err)
			}
			if st := p.out.Wait(t, 5*time.Second); st.Err == nil {
				t.Errorf("client sidecar pump ended without an error: %+v", st)
			}
		})
	}
}

// A session that ends in a FIN without close_notify (a killed client
// sidecar) is an abort at the server app, in the kernel (the splice stops
// at the socket's end; ktls.Conn says truncated) and in a fallback session
// (crypto/tls over the handoff's cork, which finWithoutCloseNotify must
// look through to see the FIN).
func TestKTLSFINWithoutCloseNotifyIsAnAbort(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startKTLSPair(t, KTLS{Use: true}, KTLS{Use: true}, nil)
	p.modes(t, agreedMode(t))
	if _, err := p.clientApp.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	p.serverApp.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(p.serverApp, make([]byte, 5)); err != nil {
		t.Fatalf("data before the cut: %v", err)
	}
	pump.TCPOf(p.up).CloseWrite() // under the TLS layer: no close_notify
	if err := readUntilErr(t, p.serverApp, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server app read %v after a FIN without close_notify; want ECONNRESET", err)
	}
}

// An intention that starts denying the source closes a kernel TLS session
// under the pump (the socket the kernel seals on): the client app is reset
// (its sidecar sees a FIN without close_notify), the connection counted as
// revoked.
func TestKTLSRevocation(t *testing.T) {
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
	p := startKTLSPairWith(t, KTLS{Use: true}, KTLS{Use: true}, nil, w)
	p.modes(t, agreedMode(t))
	if _, err := p.clientApp.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	p.serverApp.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(p.serverApp, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	close(deny)
	if err := readUntilErr(t, p.clientApp, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client app read %v after the revocation; want ECONNRESET", err)
	}
	testkit.Eventually(t, "revoked counted", func() bool { return counter(p.in, "inbound", "revoked") == 1 })
}

// Shutting the server sidecar down past its drain deadline cuts a kernel
// TLS session as an abort: the client app reads a reset, never a clean
// end of a truncated stream.
func TestKTLSDrainDeadlineResets(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startKTLSPair(t, KTLS{Use: true}, KTLS{Use: true}, nil)
	p.modes(t, agreedMode(t))
	if _, err := p.serverApp.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	p.in.Shutdown(ctx)
	if err := readUntilErr(t, p.clientApp, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client app read %v after the drain deadline; want ECONNRESET", err)
	}
}

// -ktls=required refuses sessions that stay in user space, on either end:
// a server whose client did not offer kernel TLS, a client whose server
// did not select it.
func TestKTLSRequiredRefusesUserSpace(t *testing.T) {
	req := KTLS{Use: true, Required: true}
	t.Run("server", func(t *testing.T) {
		testkit.CheckLeaks(t)
		var err error
		p := startKTLSPair(t, KTLS{}, req, &err)
		if err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, "refused", func() bool { return counter(p.in, "inbound", "handshake_error") == 1 })
		if got := p.inModes.With("inbound", tlsModeUser).Value(); got != 1 {
			t.Errorf("inbound user-space sessions %d, want 1 (counted, then refused)", got)
		}
		if err := readUntilErr(t, p.clientApp, 5*time.Second); err == nil {
			t.Fatal("the client app read a clean end")
		}
	})
	t.Run("client", func(t *testing.T) {
		testkit.CheckLeaks(t)
		var err error
		startKTLSPair(t, req, KTLS{}, &err)
		if err == nil || !strings.Contains(err.Error(), "-ktls=required") || !strings.Contains(err.Error(), "userspace") {
			t.Fatalf("dial with -ktls=required to a server without kernel TLS: %v", err)
		}
	})
}

// The inbound side selects kernel TLS only for a client that offers it,
// ahead of tunnels, and stays as it was for everybody else.
func TestInboundKTLSALPN(t *testing.T) {
	ca := mtlstest.NewCA(t)
	a := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256), KTLS: KTLS{Use: true}}
	a.Init()
	srv := mtlstest.StartServer(t, a.cfg)
	client := ca.Identity(t, "web", mtlstest.EC256)
	noTunnels := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256), KTLS: KTLS{Use: true}, DisableTunnels: true}
	noTunnels.Init()
	off := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256)}
	off.Init()
	for _, tc := range []struct {
		name   string
		offer  []string
		expect string
		a      *MeshAcceptor
	}{
		// A server without tunnels, or without kernel TLS, never selects
		// a token it cannot serve: the client's next choice is taken.
		{"ktls tunnel peer, server without tunnels", []string{KTLSTunnelALPN, tunnel.ALPN}, "", noTunnels},
		{"ktls tunnel peer, server ktls off", []string{KTLSTunnelALPN, tunnel.ALPN}, tunnel.ALPN, off},
		{"connect-native h2", []string{"h2"}, "", nil},
		{"no ALPN", nil, "", nil},
		{"tunnel peer", []string{tunnel.ALPN}, tunnel.ALPN, nil},
		{"ktls peer", []string{KTLSALPN}, KTLSALPN, nil},
		{"both", []string{tunnel.ALPN, KTLSALPN}, KTLSALPN, nil},
		{"ktls tunnel peer", []string{KTLSTunnelALPN, tunnel.ALPN}, KTLSTunnelALPN, nil},
		{"ktls tunnel peer, tunnel first", []string{tunnel.ALPN, KTLSTunnelALPN}, KTLSTunnelALPN, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := client.ClientConfig(ca.ID("api"))
			cfg.NextProtos = tc.offer
			s := srv
			if tc.a != nil {
				s = mtlstest.StartServer(t, tc.a.cfg)
			}
			cs, err, sr := s.Dial(t, cfg)
			mtlstest.MustOK(t, err, sr)
			if cs.NegotiatedProtocol != tc.expect {
				t.Fatalf("negotiated %q, want %q", cs.NegotiatedProtocol, tc.expect)
			}
		})
	}
}

// A server that accepts kernel TLS still gives user-space clients (a
// ferry with -ktls=off, Consul's built-in proxy, Envoy) session tickets
// that resume on the next connection: the handoff clones the config per
// connection, and the ticket keys stay shared (mtls wraps tickets with the
// base config).
func TestKTLSServerTicketsResumeUserSpaceClients(t *testing.T) {
	testkit.CheckLeaks(t)
	ca := mtlstest.NewCA(t)
	acc := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256), Intentions: allowAll(t), Service: "api",
		KTLS: KTLS{Use: true}, TLSModes: NewTLSModeMetric(), DisableTunnels: true}
	acc.Init()
	p := startProxy(t, Config{Acceptor: acc,
		Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testkit.LogWriter{T: t}})}, testkit.EchoServer(t))
	inAddr, _ := p.Addrs()
	r := NewMeshRouter(nil, ca.Identity(t, "web", mtlstest.EC256), nil)
	r.DisableTunnels()
	t.Cleanup(r.Close)
	cfg := r.clientConfig(catalog.Service{Name: "api", Datacenter: ca.Datacenter})
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := r.dialTLS(ctx, inAddr.String(), cfg, false, nil)
		cancel()
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		c.(interface{ CloseWrite() error }).CloseWrite()
		// Reading takes the ticket in (crypto/tls handles it on Read).
		got, err := testkit.ReadAllTimeout(t, c, 5*time.Second)
		c.Close()
		if err != nil || string(got) != "ping" {
			t.Fatalf("dial %d: echo %q, %v", i, got, err)
		}
	}
	if full, resumed := r.handshakes.With("false").Value(), r.handshakes.With("true").Value(); full != 1 || resumed != 1 {
		t.Fatalf("handshakes: %d full, %d resumed; want 1 and 1", full, resumed)
	}
	if got := r.TLSModeMetric().With("outbound", tlsModeUser).Value(); got != 2 {
		t.Fatalf("outbound user-space sessions %d, want 2", got)
	}
}
