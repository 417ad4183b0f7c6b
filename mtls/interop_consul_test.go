package mtls_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/test/testbed"
)

// TestInteropBuiltinProxy checks the package's configs against Consul's
// own Go sidecar (`consul connect proxy`, run on the host loopback): our
// client verifies the built-in proxy's leaf by exact SPIFFE ID, and the
// built-in proxy's client accepts our server and is accepted by it.
func TestInteropBuiltinProxy(t *testing.T) {
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
		app := echoServer(t, nil)
		pub := freePort(t)
		startProcess(t, consul, "connect", "proxy", "-http-addr", tb.Consul.HTTPAddr,
			"-service", "api", "-service-addr", app, "-listen", "127.0.0.1:"+strconv.Itoa(pub))
		cfg := web.ClientConfig(mtls.ServiceID(web.TrustDomain(), dc, "api"))
		var cs tls.ConnectionState
		retryUntil(t, 20*time.Second, func() error {
			var err error
			cs, err = echoOverTLS("127.0.0.1:"+strconv.Itoa(pub), cfg, []byte("hello from ferry"))
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
		srvAddr := echoServer(t, func(c net.Conn) (net.Conn, error) {
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
		local := freePort(t)
		startProcess(t, consul, "connect", "proxy", "-http-addr", tb.Consul.HTTPAddr,
			"-service", "web", "-upstream", "backend:"+strconv.Itoa(local))
		msg := []byte("hello from the built-in proxy")
		retryUntil(t, 20*time.Second, func() error {
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

// echoServer echoes on loopback; wrap (if set) turns each accepted
// connection into the one to echo on (e.g. a TLS server).
func echoServer(t *testing.T, wrap func(net.Conn) (net.Conn, error)) string {
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

func echoOverTLS(addr string, cfg *tls.Config, msg []byte) (tls.ConnectionState, error) {
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

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func startProcess(t *testing.T, argv ...string) {
	t.Helper()
	var out bytes.Buffer
	var mu sync.Mutex
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return out.Write(p) })
	cmd := exec.Command(argv[0], argv[1:]...)
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

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// retryUntil retries op until it succeeds: the other side is a separate
// process whose readiness we only see by connecting.
func retryUntil(t *testing.T, d time.Duration, op func() error) {
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
