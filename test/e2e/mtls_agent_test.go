package e2e

// The mtls package's watcher and TLS configs against a real agent and
// Consul's own Go sidecar (moved here from package mtls: nothing imports
// test/, not even mtls's tests).

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls/mtlstest"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/test/testbed"
)

// TestMTLSWatchAgent runs the watcher against a real `consul agent -dev`:
// first leaf and roots, a CA key-type rotation picked up without
// rebuilding TLS configs, and an agent restart (new CA, index going back).
func TestMTLSWatchAgent(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)

	baseG := runtime.NumGoroutine()
	tr := &http.Transport{}
	client, err := api.NewClient(&api.Config{Address: tb.Consul.HTTPAddr, Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	logger := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: maTestWriter{t}})
	opts := mtls.WatchOptions{Logger: logger, MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	watch := func(service string) (*mtls.Identity, chan error) {
		id := mtls.NewIdentity()
		done := make(chan error, 1)
		go func() { done <- id.Watch(ctx, client, service, opts) }()
		return id, done
	}
	web, webDone := watch("web")
	apiID, apiDone := watch("api")
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		for _, d := range []chan error{webDone, apiDone} {
			select {
			case err := <-d:
				if err != context.Canceled {
					t.Errorf("Watch returned %v, want context.Canceled", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("Watch did not return after cancel")
			}
		}
	}
	t.Cleanup(stop)

	start := time.Now()
	for _, id := range []*mtls.Identity{web, apiID} {
		select {
		case <-id.Ready():
		case <-time.After(30 * time.Second):
			t.Fatalf("identity not ready: %+v", id.Status())
		}
	}
	t.Logf("both identities ready after %v", time.Since(start))

	roots, _, err := client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	self, err := client.Agent().Self()
	if err != nil {
		t.Fatal(err)
	}
	dc, _ := self["Config"]["Datacenter"].(string)
	want := mtls.ServiceID(roots.TrustDomain, dc, "web")
	if got := web.ID(); got != want {
		t.Fatalf("leaf ID = %v, want %v", got, want)
	}
	if web.TrustDomain() != roots.TrustDomain {
		t.Fatalf("trust domain %q, want %q", web.TrustDomain(), roots.TrustDomain)
	}
	if st := web.Status(); !st.Ready || !st.LeafTrusts || st.RootCount != len(roots.Roots) {
		t.Fatalf("status = %+v (agent has %d roots)", st, len(roots.Roots))
	}
	if k, ok := web.Leaf().X509.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("default leaf key is %T, want EC P-256", web.Leaf().X509.PublicKey)
	}

	// Real Consul leaves through the package's configs, built once.
	srv := mtlstest.StartServer(t, apiID.ServerConfig())
	clientCfg := web.ClientConfig(mtls.ServiceID(roots.TrustDomain, dc, "api"))
	_, cerr, sr := srv.Dial(t, clientCfg)
	mtlstest.MustOK(t, cerr, sr)
	if id, _ := mtls.PeerID(sr.State); id != want {
		t.Fatalf("server saw %v, want %v", id, want)
	}

	// Rotate the CA to a new key type: new root (old one kept), new leaves.
	oldLeaf := web.Leaf()
	conf, _, err := client.Connect().CAGetConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	conf.Config["PrivateKeyType"] = "rsa"
	conf.Config["PrivateKeyBits"] = 2048
	rotated := time.Now()
	if _, err := client.Connect().CASetConfig(conf, nil); err != nil {
		t.Fatal(err)
	}
	// Roots follow at once. Leaves follow within the agent's 30 s
	// jitter window for re-signing after a root change
	// (caChangeJitterWindow); the agent keeps generating EC P-256 leaf
	// keys, now signed by the RSA root.
	for _, id := range []*mtls.Identity{web, apiID} {
		testkit.EventuallyShow(t, 10*time.Second, "two roots", func() bool {
			return len(id.Roots().Certs) >= 2
		}, func() any { return id.Status() })
	}
	t.Logf("new roots picked up %v after the CA change", time.Since(rotated))
	for _, id := range []*mtls.Identity{web, apiID} {
		testkit.EventuallyShow(t, 45*time.Second, "leaf signed by the new RSA root", func() bool {
			return id.Leaf().X509.SignatureAlgorithm == x509.SHA256WithRSA
		}, func() any { return id.Status() })
	}
	t.Logf("new leaves picked up %v after the CA change", time.Since(rotated))
	if web.Leaf().Serial == oldLeaf.Serial || web.ID() != want {
		t.Fatalf("leaf after rotation: serial %s (old %s), id %v", web.Leaf().Serial, oldLeaf.Serial, web.ID())
	}
	if st := web.Status(); !st.Ready || !st.LeafTrusts {
		t.Fatalf("status after rotation = %+v", st)
	}
	// Same configs, new leaves on both sides.
	cs, cerr, sr := srv.Dial(t, clientCfg)
	mtlstest.MustOK(t, cerr, sr)
	if alg := cs.PeerCertificates[0].SignatureAlgorithm; alg != x509.SHA256WithRSA {
		t.Fatalf("server presented a leaf signed with %v after rotation, want SHA256-RSA", alg)
	}
	// A peer still on its old leaf (old root) is accepted during the overlap.
	_, cerr, sr = srv.Dial(t, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{*oldLeaf.Cert}})
	mtlstest.MustOK(t, cerr, sr)

	// Agent restart: a dev agent comes back with a new CA and trust domain
	// and lower indexes. The watch must recover on its own.
	oldTD := web.TrustDomain()
	tb.Consul.Stop()
	if err := tb.Consul.Start(); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	testkit.EventuallyShow(t, 30*time.Second, "new trust domain after agent restart", func() bool {
		return web.TrustDomain() != oldTD && web.ID().TrustDomain == web.TrustDomain()
	}, func() any { return web.Status() })
	t.Logf("identity followed the restarted agent after %v", time.Since(restarted))

	stop()
	tr.CloseIdleConnections()
	testkit.EventuallyShow(t, 10*time.Second, "watch goroutines gone", func() bool {
		return runtime.NumGoroutine() <= baseG+2 // tolerance: runtime/test helpers
	}, func() any { return runtime.NumGoroutine() })
}

type maTestWriter struct{ t *testing.T }

func (w maTestWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestMTLSConfigsInteropBuiltin checks the package's configs against Consul's
// own Go sidecar (`consul connect proxy`, run on the host loopback): our
// client verifies the built-in proxy's leaf by exact SPIFFE ID, and the
// built-in proxy's client accepts our server and is accepted by it.
func TestMTLSConfigsInteropBuiltin(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	consul := testbed.ConsulBinary(t)
	client := tb.Consul.Client

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	watch := func(service string) *mtls.Identity {
		id := mtls.NewIdentity()
		wg.Go(func() { _ = id.Watch(ctx, client, service, mtls.WatchOptions{}) })
		select {
		case <-id.Ready():
		case <-time.After(30 * time.Second):
			t.Fatalf("%s identity not ready: %+v", service, id.Status())
		}
		return id
	}
	dc := watch("web").ID().Datacenter

	t.Run("ferry client to built-in server", func(t *testing.T) {
		web := watch("web")
		app := maEchoServer(t, nil)
		pub := maFreePort(t)
		maStartProcess(t, consul, "connect", "proxy", "-http-addr", tb.Consul.HTTPAddr,
			"-service", "api", "-service-addr", app, "-listen", "127.0.0.1:"+strconv.Itoa(pub))
		cfg := web.ClientConfig(mtls.ServiceID(web.TrustDomain(), dc, "api"))
		var cs tls.ConnectionState
		maRetryUntil(t, 20*time.Second, func() error {
			var err error
			cs, err = maEchoOverTLS("127.0.0.1:"+strconv.Itoa(pub), cfg, []byte("hello from ferry"))
			return err
		})
		if id, _ := mtls.PeerID(cs); id != mtls.ServiceID(web.TrustDomain(), dc, "api") {
			t.Fatalf("built-in proxy presented %v", id)
		}
		t.Logf("built-in server: %s, %v", tls.VersionName(cs.Version), cs.CurveID)
	})

	t.Run("built-in client to ferry server", func(t *testing.T) {
		backend := watch("backend")
		peers := make(chan mtls.SpiffeID, 4)
		srvAddr := maEchoServer(t, func(c net.Conn) (net.Conn, error) {
			tc := tls.Server(c, backend.ServerConfig())
			_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.Handshake(); err != nil {
				return nil, err
			}
			_ = tc.SetDeadline(time.Time{})
			id, err := mtls.PeerID(tc.ConnectionState())
			if err != nil {
				return nil, err
			}
			peers <- id
			return tc, nil
		})
		host, port, _ := net.SplitHostPort(srvAddr)
		p, _ := strconv.Atoi(port)
		// A sidecar registration without checks is passing at once, so the
		// built-in proxy's health query finds it.
		reg := &api.AgentServiceRegistration{
			Kind: api.ServiceKindConnectProxy, ID: "backend-sidecar-proxy", Name: "backend-sidecar-proxy",
			Address: host, Port: p,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "backend"},
		}
		if err := client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = client.Agent().ServiceDeregister(reg.ID) })
		local := maFreePort(t)
		maStartProcess(t, consul, "connect", "proxy", "-http-addr", tb.Consul.HTTPAddr,
			"-service", "web", "-upstream", "backend:"+strconv.Itoa(local))
		msg := []byte("hello from the built-in proxy")
		maRetryUntil(t, 20*time.Second, func() error {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(local), 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(msg); err != nil {
				return err
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil {
				return err
			}
			if !bytes.Equal(got, msg) {
				return fmt.Errorf("echo %q", got)
			}
			return nil
		})
		select {
		case id := <-peers:
			if id != mtls.ServiceID(backend.TrustDomain(), dc, "web") {
				t.Fatalf("ferry server saw client %v", id)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("server saw no peer")
		}
	})
}

// maEchoServer echoes on loopback; wrap (if set) turns each accepted
// connection into the one to echo on (e.g. a TLS server).
func maEchoServer(t *testing.T, wrap func(net.Conn) (net.Conn, error)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				conn := c
				if wrap != nil {
					if conn, err = wrap(c); err != nil {
						t.Logf("echo server: %v", err)
						return
					}
				}
				_, _ = io.Copy(conn, conn)
			})
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

func maEchoOverTLS(addr string, cfg *tls.Config, msg []byte) (tls.ConnectionState, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	tc := tls.Client(c, cfg)
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		return tls.ConnectionState{}, err
	}
	if _, err := tc.Write(msg); err != nil {
		return tls.ConnectionState{}, err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(tc, got); err != nil {
		return tls.ConnectionState{}, err
	}
	if !bytes.Equal(got, msg) {
		return tls.ConnectionState{}, fmt.Errorf("echo %q", got)
	}
	return tc.ConnectionState(), nil
}

func maFreePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func maStartProcess(t *testing.T, argv ...string) {
	t.Helper()
	var out bytes.Buffer
	var mu sync.Mutex
	w := maWriterFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return out.Write(p) })
	cmd := testbed.MustCommand(t, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			mu.Lock()
			t.Logf("%s output:\n%s", argv[0], out.String())
			mu.Unlock()
		}
	})
}

type maWriterFunc func([]byte) (int, error)

func (f maWriterFunc) Write(p []byte) (int, error) { return f(p) }

// maRetryUntil retries op until it succeeds: the other side is a separate
// process whose readiness we only see by connecting.
func maRetryUntil(t *testing.T, d time.Duration, op func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := op()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after %v: %v", d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
