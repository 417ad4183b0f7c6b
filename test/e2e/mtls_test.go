package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// Issue 5 end to end: identities from Consul's CA, mutual TLS between two
// ferry sidecars over a virtual IP, the inbound's refusal of plain TCP and
// its certificate, interop with `consul connect proxy` both ways, and a CA
// rotation under a live stream.

const (
	mtAppPort = 8080
	mtBulk    = 5 << 20
	// sample names in ferry's /metrics
	mtResumed = `ferry_outbound_tls_handshakes_total{resumed="true"}`
	mtFull    = `ferry_outbound_tls_handshakes_total{resumed="false"}`
	// App connections carried over a pooled tunnel session (no handshake).
	mtReused = `ferry_outbound_tunnels_total{session="reused"}`
	// The backend app resets a connection that opens with this.
	mtResetToken = "RESET-ME"
)

// mtMesh is frontend -> backend through two ferry sidecars, plus a pod
// outside the mesh (no redirect rules, no sidecar).
type mtMesh struct {
	t                           *testing.T // the test the pods and sidecars live for
	tb                          *testbed.Testbed
	frontend, backend, outsider *testbed.Pod
	backendApp                  *testbed.Process
	fe, be                      *testbed.Process // the ferry sidecars
	frontendID                  string           // the frontend's proxy ID
	vip                         string           // backend VIP:app port
}

func mtSetup(t *testing.T) *mtMesh {
	t.Helper()
	testbed.RequireRoot(t)
	m := &mtMesh{t: t, tb: testbed.New(t)}
	m.frontend = m.tb.AddPod(t, "frontend")
	m.backend = m.tb.AddPod(t, "backend")
	m.outsider = m.tb.AddPod(t, "outsider")
	fr := m.tb.Register(t, testbed.Service{Name: "frontend", Pod: m.frontend, Port: mtAppPort})
	br := m.tb.Register(t, testbed.Service{Name: "backend", Pod: m.backend, Port: mtAppPort})
	// The backend app listens on every address: only its sidecar stands
	// between it and the outsider.
	m.backendApp = meshEchoServer(t, m.backend, "backend app", ":"+strconv.Itoa(mtAppPort),
		"-report", "-reset-token", mtResetToken)
	m.fe = meshSidecar(t, m.frontend, fr.ProxyID)
	m.frontendID = fr.ProxyID
	m.be = meshSidecar(t, m.backend, br.ProxyID, "-log-level", "debug")
	m.vip = net.JoinHostPort(meshVIP(t, m.tb, "backend"), strconv.Itoa(mtAppPort))
	return m
}

// restartFrontend stops the frontend's sidecar and starts it again with
// extra flags.
func (m *mtMesh) restartFrontend(t *testing.T, extra ...string) {
	t.Helper()
	if err := m.fe.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := m.fe.Wait(20 * time.Second); err != nil {
		t.Fatalf("frontend sidecar after SIGTERM: %v\n%s", err, m.fe.Output())
	}
	m.fe = meshRestart(t, m.t, m.frontend, m.frontendID, extra...)
}

// waitAccepts waits until the backend app has printed n accept lines (its
// output reaches the test through a pipe, a little after the fact).
func (m *mtMesh) waitAccepts(t *testing.T, n int) {
	t.Helper()
	meshPoll(t, fmt.Sprintf("backend app accept #%d", n), 5*time.Second, func() bool {
		return meshAccepts(m.backendApp) >= n
	})
	if got := meshAccepts(m.backendApp); got != n {
		t.Fatalf("backend app accepted %d connections, want %d", got, n)
	}
}

// sentinel proves that nothing reached the backend app since it had
// accepted `before` connections: one good connection from the frontend
// must be the only new accept line (the app prints them in order).
func (m *mtMesh) sentinel(t *testing.T, before int) {
	t.Helper()
	if out, err := meshEchoClient(t, m.frontend, m.vip, 1024, 1); err != nil {
		t.Fatalf("sentinel connection from the frontend: %v\n%s", err, out)
	}
	m.waitAccepts(t, before+1)
}

func TestMTLSMesh(t *testing.T) {
	m := mtSetup(t)
	c := m.tb.Consul.Client
	inbound := net.JoinHostPort(m.backend.IP.String(), "20000")

	t.Run("5 MiB frontend to backend VIP through two sidecars, half-close", func(t *testing.T) {
		accepts := meshAccepts(m.backendApp)
		sent := meshMetric(t, m.frontend, `ferry_sent_bytes_total{direction="outbound"}`)
		out, err := meshEchoClient(t, m.frontend, m.vip, mtBulk, 1)
		if err != nil || !strings.Contains(out, "ok conns=1") {
			t.Fatalf("echo client -> %s: %v\n%s", m.vip, err, out)
		}
		t.Logf("%s", strings.TrimSpace(out))
		m.waitAccepts(t, accepts+1)
		// The bytes went through the frontend's ferry (mTLS), not around
		// it; they are counted when ferry has finished the connection.
		meshPoll(t, "frontend ferry counting the 5 MiB", 5*time.Second, func() bool {
			return meshMetric(t, m.frontend, `ferry_sent_bytes_total{direction="outbound"}`)-sent >= mtBulk
		})
		if d := meshMetric(t, m.frontend, `ferry_sent_bytes_total{direction="outbound"}`) - sent; d != mtBulk {
			t.Fatalf("frontend ferry sent %d bytes upstream, want %d", d, mtBulk)
		}
		if meshMetric(t, m.frontend, mtFull)+meshMetric(t, m.frontend, mtResumed) == 0 {
			t.Fatal("frontend ferry counted no outbound mTLS handshake")
		}
		if !meshLogHas(m.be, "inbound connection authorized", "/svc/frontend") {
			t.Fatalf("backend ferry did not log the frontend's SPIFFE ID:\n%s", m.be.Output())
		}
	})

	t.Run("plain TCP from outside the mesh never reaches the backend app", func(t *testing.T) {
		accepts := meshAccepts(m.backendApp)
		refused := meshMetric(t, m.backend, `ferry_connections_total{direction="inbound",outcome="handshake_error"}`)
		app := net.JoinHostPort(m.backend.IP.String(), strconv.Itoa(mtAppPort))
		for _, addr := range []string{app, inbound} {
			out, err := meshEchoClient(t, m.outsider, addr, 1024, 1, "-timeout", "5s")
			if err == nil {
				t.Fatalf("plain client reached %s:\n%s", addr, out)
			}
			t.Logf("outsider -> %s: %s", addr, strings.TrimSpace(out))
		}
		m.sentinel(t, accepts)
		if d := meshMetric(t, m.backend, `ferry_connections_total{direction="inbound",outcome="handshake_error"}`) - refused; d != 2 {
			t.Fatalf("backend ferry refused %d connections, want 2", d)
		}
	})

	t.Run("backend inbound presents the backend SPIFFE ID and requires a client certificate", func(t *testing.T) {
		pool, want := mtRoots(t, c), mtServiceID(t, c, "backend")
		accepts := meshAccepts(m.backendApp)
		cs, err := mtTLSEcho(m.outsider, inbound, mtLeaf(t, c, "frontend"))
		if err != nil {
			t.Fatalf("TLS with the frontend's leaf: %v", err)
		}
		mtCheckPeer(t, cs, pool, want)
		t.Logf("backend inbound: %s, %s, peer %s", tls.VersionName(cs.Version), cs.CurveID, want)
		accepts++
		m.waitAccepts(t, accepts)

		if _, err := mtTLSEcho(m.outsider, inbound, tls.Certificate{}); err == nil {
			t.Fatal("TLS without a client certificate reached the app")
		} else {
			t.Logf("without a client certificate: %v", err)
		}
		m.sentinel(t, accepts)
	})

	t.Run("repeat connections between the sidecars reuse the session; new sessions resume", func(t *testing.T) {
		full, resumed, reused := meshMetric(t, m.frontend, mtFull), meshMetric(t, m.frontend, mtResumed), meshMetric(t, m.frontend, mtReused)
		const n = 5
		for i := range n {
			if out, err := meshEchoClient(t, m.frontend, m.vip, 4096, 1); err != nil {
				t.Fatalf("connection %d: %v\n%s", i, err, out)
			}
		}
		df, dr, du := meshMetric(t, m.frontend, mtFull)-full, meshMetric(t, m.frontend, mtResumed)-resumed, meshMetric(t, m.frontend, mtReused)-reused
		t.Logf("%d sequential connections: %d over a reused tunnel session, %d resumed, %d full handshakes", n, du, dr, df)
		if du < n-1 || df+dr > 1 {
			t.Fatalf("%d of %d sequential connections reused a session (%d handshakes); want at least %d and at most 1", du, n, df+dr, n-1)
		}
		// Connections open at the same time need sessions of their own:
		// those resume the TLS session instead of a full handshake.
		full, resumed = meshMetric(t, m.frontend, mtFull), meshMetric(t, m.frontend, mtResumed)
		if out, err := meshEchoClient(t, m.frontend, m.vip, 4096, 4, "-hold", "500ms"); err != nil {
			t.Fatalf("4 concurrent connections: %v\n%s", err, out)
		}
		df, dr = meshMetric(t, m.frontend, mtFull)-full, meshMetric(t, m.frontend, mtResumed)-resumed
		t.Logf("4 concurrent connections: %d new sessions resumed, %d full handshakes", dr, df)
		if dr < 3 || df > 0 {
			t.Fatalf("4 concurrent connections: %d resumed and %d full handshakes; want at least 3 and 0", dr, df)
		}
	})
	// An abort must cross both sidecars as an abort, both ways, over a
	// tunnel and over a plain mTLS session: a truncated upload must never
	// look complete to the other app (audit F4).
	t.Run("a reset from either app reaches the other app as a reset", func(t *testing.T) {
		for _, mode := range []struct {
			name  string
			extra []string // frontend sidecar flags: restart it without tunnels
		}{{"tunnel", nil}, {"one mTLS session per connection", []string{"-tunnels=false"}}} {
			if mode.extra != nil {
				m.restartFrontend(t, mode.extra...)
			}
			// The client app resets after its bytes crossed: the backend
			// app's read must end in ECONNRESET, not EOF.
			accepts := meshAccepts(m.backendApp)
			out, err := meshEchoClient(t, m.frontend, m.vip, 4096, 1, "-reset")
			if err != nil {
				t.Fatalf("%s: resetting client: %v\n%s", mode.name, err, out)
			}
			k := strconv.Itoa(accepts + 1)
			meshPoll(t, "backend app reporting connection "+k, 5*time.Second, func() bool {
				return strings.Contains(m.backendApp.Output(), "\nend "+k+" ")
			})
			line := meshLine(m.backendApp.Output(), "end "+k+" ")
			if !strings.Contains(line, "connection reset by peer") {
				t.Fatalf("%s: the client app's reset reached the backend app as %q; want a reset", mode.name, line)
			}
			t.Logf("%s: client app reset -> backend app: %s", mode.name, line)
			// The backend app resets: the client app must see ECONNRESET.
			out, err = meshEchoClient(t, m.frontend, m.vip, 0, 1, "-send", mtResetToken, "-expect-reset", "-timeout", "10s")
			if err != nil {
				t.Fatalf("%s: the backend app's reset did not reach the client app as a reset: %v\n%s", mode.name, err, out)
			}
			t.Logf("%s: backend app reset -> client app: %s", mode.name, strings.TrimSpace(out))
		}
		// Back to the default (tunnels) for the subtests that follow.
		m.restartFrontend(t)
	})
	// Last: it stops the backend's sidecar. Idle tunnel sessions (the
	// frontend pools them) must not hold up a drain.
	t.Run("SIGTERM with idle tunnel sessions drains at once", func(t *testing.T) {
		if out, err := meshEchoClient(t, m.frontend, m.vip, 4096, 2, "-hold", "200ms"); err != nil {
			t.Fatalf("connections before the drain: %v\n%s", err, out)
		}
		t0 := time.Now()
		if err := m.be.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := m.be.Wait(10 * time.Second); err != nil {
			t.Fatalf("backend sidecar after SIGTERM: %v\n%s", err, m.be.Output())
		}
		took := time.Since(t0)
		t.Logf("backend sidecar drained and exited in %v", took.Round(time.Millisecond))
		if strings.Contains(m.be.Output(), "drain deadline reached") || took > 5*time.Second {
			t.Fatalf("drain waited for idle tunnel sessions (%v):\n%s", took, m.be.Output())
		}
	})
}

// TestMTLSRotation rotates the CA (new key type) while a 20 s stream runs
// from frontend to backend and new connections keep opening; both
// sidecars must pick up leaves from the new CA without dropping anything.
func TestMTLSRotation(t *testing.T) {
	m := mtSetup(t)
	c := m.tb.Consul.Client
	oldLeaf := mtLeaf(t, c, "frontend")
	leaves := func(pr *testbed.Process) int { return strings.Count(pr.Output(), "leaf certificate loaded") }
	// Both logged their first leaf before /ready; wait for the lines to
	// arrive so that they are not mistaken for the new ones.
	meshPoll(t, "first leaf logged by both sidecars", 5*time.Second, func() bool {
		return leaves(m.fe) > 0 && leaves(m.be) > 0
	})
	feLeaves, beLeaves := leaves(m.fe), leaves(m.be)

	accepts := meshAccepts(m.backendApp)
	stream := m.frontend.Start(t, testbed.Proc{Name: "20 s stream"}, testbed.EchoBinary(t), "client",
		"-addr", m.vip, "-bytes", strconv.Itoa(8<<20), "-pace", "20s", "-timeout", "60s")
	meshPoll(t, "stream accepted by the backend app", 10*time.Second, func() bool {
		return meshAccepts(m.backendApp) > accepts
	})

	conf, _, err := c.Connect().CAGetConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	conf.Config["PrivateKeyType"] = "rsa"
	conf.Config["PrivateKeyBits"] = 2048
	if _, err := c.Connect().CASetConfig(conf, nil); err != nil {
		t.Fatal(err)
	}
	rotated := time.Now()

	// New connections, before and after each sidecar's new leaf, until the
	// stream has ended and both leaves have changed. The agent re-signs
	// leaves after a random delay of up to 30 s.
	var conns int
	var feAt, beAt time.Duration
	for {
		if out, err := meshEchoClient(t, m.frontend, m.vip, 64<<10, 1, "-timeout", "10s"); err != nil {
			t.Fatalf("new connection %d, %v after the rotation: %v\n%s", conns, time.Since(rotated), err, out)
		}
		conns++
		if feAt == 0 && leaves(m.fe) > feLeaves {
			feAt = time.Since(rotated)
		}
		if beAt == 0 && leaves(m.be) > beLeaves {
			beAt = time.Since(rotated)
		}
		select {
		case <-stream.Done():
		default:
			time.Sleep(300 * time.Millisecond)
			continue
		}
		if feAt > 0 && beAt > 0 {
			break
		}
		if time.Since(rotated) > 45*time.Second {
			t.Fatalf("new leaves not loaded 45 s after the rotation (frontend %v, backend %v)", feAt, beAt)
		}
		time.Sleep(300 * time.Millisecond)
	}
	// And once both new leaves are in place.
	if out, err := meshEchoClient(t, m.frontend, m.vip, 64<<10, 4, "-timeout", "10s"); err != nil {
		t.Fatalf("new connections with both new leaves: %v\n%s", err, out)
	}
	// Sessions from before the rotation are no longer used (the pool
	// retires them on the identity change), but the new ones are reused.
	reused := meshMetric(t, m.frontend, mtReused)
	for i := range 3 {
		if out, err := meshEchoClient(t, m.frontend, m.vip, 4096, 1, "-timeout", "10s"); err != nil {
			t.Fatalf("connection %d after the rotation: %v\n%s", i, err, out)
		}
	}
	if d := meshMetric(t, m.frontend, mtReused) - reused; d < 2 {
		t.Fatalf("only %d of 3 connections after the rotation reused a session", d)
	}
	if err := stream.Wait(time.Second); err != nil || !strings.Contains(stream.Output(), "ok conns=1") {
		t.Fatalf("the live stream did not survive the rotation: %v\n%s", err, stream.Output())
	}
	t.Logf("stream: %s", strings.TrimSpace(stream.Output()))
	t.Logf("new leaf loaded %v (frontend) and %v (backend) after the CA change; %d new connections all succeeded",
		feAt.Round(time.Millisecond), beAt.Round(time.Millisecond), conns)

	// The backend now presents a leaf signed by the RSA root, and still
	// accepts a client leaf from the old CA (both roots are trusted).
	inbound := net.JoinHostPort(m.backend.IP.String(), "20000")
	cs, err := mtTLSEcho(m.outsider, inbound, oldLeaf)
	if err != nil {
		t.Fatalf("old-CA client leaf after the rotation: %v", err)
	}
	mtCheckPeer(t, cs, mtRoots(t, c), mtServiceID(t, c, "backend"))
	if alg := cs.PeerCertificates[0].SignatureAlgorithm; alg != x509.SHA256WithRSA {
		t.Fatalf("backend leaf signed with %v after the rotation, want SHA256-RSA", alg)
	}
}

// TestMTLSInteropBuiltin runs `consul connect proxy` (Consul's own Go
// sidecar) opposite ferry in both directions. The built-in proxy tears a
// stream down at the first EOF, so the clients here read back exactly
// what they sent instead of half-closing.
func TestMTLSInteropBuiltin(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	consul := testbed.ConsulBinary(t)
	frontend, backend := tb.AddPod(t, "frontend"), tb.AddPod(t, "backend")
	apiPod, webPod := tb.AddPod(t, "api"), tb.AddPod(t, "web")
	fr := tb.Register(t, testbed.Service{Name: "frontend", Pod: frontend, Port: mtAppPort})
	br := tb.Register(t, testbed.Service{Name: "backend", Pod: backend, Port: mtAppPort})
	// The built-in proxy binds its public listener on the proxy
	// registration's Address:Port (pod IP:20000), which is what ferry
	// finds in the catalog; it has no transparent mode.
	ar := tb.Register(t, testbed.Service{Name: "api", Pod: apiPod, Port: mtAppPort, Direct: true})
	const upPort = 9191
	wr := tb.Register(t, testbed.Service{Name: "web", Pod: webPod, Port: mtAppPort, Direct: true,
		Upstreams: []api.Upstream{{DestinationName: "backend", LocalBindPort: upPort}}})

	local := "127.0.0.1:" + strconv.Itoa(mtAppPort)
	apiApp := meshEchoServer(t, apiPod, "api app", local)
	backendApp := meshEchoServer(t, backend, "backend app", local)
	apiProxy := apiPod.Start(t, testbed.Proc{Name: "consul connect proxy (api)"}, consul, "connect", "proxy", "-sidecar-for", ar.ID)
	webPod.Start(t, testbed.Proc{Name: "consul connect proxy (web)"}, consul, "connect", "proxy", "-sidecar-for", wr.ID)
	meshSidecar(t, frontend, fr.ProxyID)
	be := meshSidecar(t, backend, br.ProxyID, "-log-level", "debug")

	t.Run("ferry to a service behind consul connect proxy", func(t *testing.T) {
		vip := net.JoinHostPort(meshVIP(t, tb, "api"), strconv.Itoa(mtAppPort))
		accepts := meshAccepts(apiApp)
		out := mtRetry(t, 20*time.Second, func() (string, error) {
			return meshEchoClient(t, frontend, vip, 1<<20, 1, "-no-half-close", "-timeout", "10s")
		})
		t.Logf("frontend -> api %s: %s", vip, strings.TrimSpace(out))
		meshPoll(t, "api app accepting the connection", 5*time.Second, func() bool { return meshAccepts(apiApp) > accepts })
		if meshMetric(t, frontend, mtFull)+meshMetric(t, frontend, mtResumed) == 0 {
			t.Fatalf("frontend ferry made no mTLS handshake; built-in proxy:\n%s", apiProxy.Output())
		}
	})

	t.Run("consul connect proxy with an explicit upstream to a service behind ferry", func(t *testing.T) {
		accepts := meshAccepts(backendApp)
		out := mtRetry(t, 20*time.Second, func() (string, error) {
			return meshEchoClient(t, webPod, "127.0.0.1:"+strconv.Itoa(upPort), 1<<20, 1, "-no-half-close", "-timeout", "10s")
		})
		t.Logf("web -> built-in upstream -> backend: %s", strings.TrimSpace(out))
		meshPoll(t, "backend app accepting the connection", 5*time.Second, func() bool { return meshAccepts(backendApp) > accepts })
		if !meshLogHas(be, "inbound connection authorized", "/svc/web") {
			t.Fatalf("backend ferry did not authorize the built-in proxy's web identity:\n%s", be.Output())
		}
	})
}

// mtRetry retries op (a client run against a proxy that is still coming
// up) until it succeeds; it returns op's output.
func mtRetry(t *testing.T, limit time.Duration, op func() (string, error)) string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		out, err := op()
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("still failing after %v: %v\n%s", limit, err, out)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// mtLeaf is the agent's current leaf for service as a TLS certificate.
func mtLeaf(t *testing.T, c *api.Client, service string) tls.Certificate {
	t.Helper()
	leaf, _, err := c.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// mtRoots is every CA root the agent lists.
func mtRoots(t *testing.T, c *api.Client) *x509.CertPool {
	t.Helper()
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots.Roots {
		pool.AppendCertsFromPEM([]byte(r.RootCertPEM))
	}
	return pool
}

// mtServiceID is the SPIFFE ID Consul's CA gives service, built here from
// the agent's trust domain and datacenter (not from ferry's code).
func mtServiceID(t *testing.T, c *api.Client, service string) string {
	t.Helper()
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	self, err := c.Agent().Self()
	if err != nil {
		t.Fatal(err)
	}
	dc, _ := self["Config"]["Datacenter"].(string)
	return fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", roots.TrustDomain, dc, service)
}

// mtTLSEcho opens TLS from pod to addr presenting cert (none if empty),
// without verifying the server (the caller checks it), and echoes a
// message: under TLS 1.3 a rejected client certificate shows only on the
// first read.
func mtTLSEcho(pod *testbed.Pod, addr string, cert tls.Certificate) (tls.ConnectionState, error) {
	raw, err := meshDialIn(pod, addr, 5*time.Second)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}
	if cert.Certificate != nil {
		cfg.Certificates = []tls.Certificate{cert}
	}
	tc := tls.Client(raw, cfg)
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		return tls.ConnectionState{}, fmt.Errorf("handshake: %w", err)
	}
	msg := []byte("hello over mTLS")
	if _, err := tc.Write(msg); err != nil {
		return tc.ConnectionState(), fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(tc, got); err != nil {
		return tc.ConnectionState(), fmt.Errorf("read: %w", err)
	}
	if string(got) != string(msg) {
		return tc.ConnectionState(), errors.New("echo mismatch")
	}
	return tc.ConnectionState(), nil
}

// mtCheckPeer verifies the server chain against pool (EKU serverAuth) and
// that the leaf's only URI SAN is exactly want.
func mtCheckPeer(t *testing.T, cs tls.ConnectionState, pool *x509.CertPool, want string) {
	t.Helper()
	if len(cs.PeerCertificates) == 0 {
		t.Fatal("server sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("server chain does not verify against the agent's roots: %v", err)
	}
	var uris []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
	}
	if len(uris) != 1 || uris[0] != want {
		t.Fatalf("server URI SANs %q, want exactly [%s]", uris, want)
	}
}
