package mtls_test

import (
	"crypto/tls"
	"crypto/x509"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
)

func startServer(t *testing.T, cfg *tls.Config) *mtlstest.Server { return mtlstest.StartServer(t, cfg) }

func mustOK(t *testing.T, cerr error, sr mtlstest.ServerResult) {
	t.Helper()
	mtlstest.MustOK(t, cerr, sr)
}

func mustFail(t *testing.T, cerr error, sr mtlstest.ServerResult, side, want string) {
	t.Helper()
	if cerr == nil {
		t.Fatalf("client succeeded; want failure (%s: %q)", side, want)
	}
	err := sr.Err
	if side == "client" {
		err = cerr
	}
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("%s error = %v; want it to contain %q (client: %v, server: %v)", side, err, want, cerr, sr.Err)
	}
}

func TestMutualTLSKeyTypes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		caOpts mtlstest.Options
		client mtlstest.KeyType
		server mtlstest.KeyType
	}{
		{"ec256", mtlstest.Options{}, mtlstest.EC256, mtlstest.EC256},
		{"rsa2048", mtlstest.Options{KeyType: mtlstest.RSA2048}, mtlstest.RSA2048, mtlstest.RSA2048},
		{"mixed", mtlstest.Options{}, mtlstest.RSA2048, mtlstest.EC384},
		{"ec384-intermediate", mtlstest.Options{KeyType: mtlstest.EC384, Intermediate: true}, mtlstest.EC384, mtlstest.EC256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := mtlstest.NewCAWith(t, tc.caOpts)
			web := ca.Identity(t, "web", tc.client)
			api := ca.Identity(t, "api", tc.server)
			srv := startServer(t, api.ServerConfig())
			for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
				cfg := web.ClientConfig(ca.ID("api"))
				cfg.MaxVersion = v
				cs, cerr, sr := srv.Dial(t, cfg)
				mustOK(t, cerr, sr)
				if cs.Version != v {
					t.Errorf("version = %x, want %x", cs.Version, v)
				}
				if cs.ServerName != ca.ID("api").SNI() || sr.State.ServerName != ca.ID("api").SNI() {
					t.Errorf("SNI client %q server %q, want %q", cs.ServerName, sr.State.ServerName, ca.ID("api").SNI())
				}
				if cs.NegotiatedProtocol != "" {
					t.Errorf("ALPN %q negotiated; want none", cs.NegotiatedProtocol)
				}
				if id, err := mtls.PeerID(cs); err != nil || id != ca.ID("api") {
					t.Errorf("client PeerID = %v, %v; want %v", id, err, ca.ID("api"))
				}
				if id, err := mtls.PeerID(sr.State); err != nil || id != ca.ID("web") {
					t.Errorf("server PeerID = %v, %v; want %v", id, err, ca.ID("web"))
				}
			}
		})
	}
}

func TestWrongServerIdentityRejected(t *testing.T) {
	ca := mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256)
	impostor := ca.Identity(t, "db", mtlstest.EC256) // valid leaf, wrong service
	srv := startServer(t, impostor.ServerConfig())
	_, cerr, sr := srv.Dial(t, web.ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "client", `server identity "`+ca.ID("db").String()+`" is not the expected`)

	// Same service, other datacenter: exact matching rejects it, the
	// lenient (built-in proxy) rule accepts it as long as the service matches.
	other := ca.ID("api")
	other.Datacenter = "dc2"
	_, cerr, sr = srv.Dial(t, web.ClientConfig(other))
	mustFail(t, cerr, sr, "client", "is not the expected")

	api := ca.Identity(t, "api", mtlstest.EC256)
	srv2 := startServer(t, api.ServerConfig())
	tdOther := ca.ID("API")
	tdOther.TrustDomain = "elsewhere.consul"
	_, cerr, sr = srv2.Dial(t, web.ClientConfig(tdOther))
	mustFail(t, cerr, sr, "client", "is not the expected")
	_, cerr, sr = srv2.Dial(t, web.ClientConfig(tdOther, mtls.WithLenientSANMatch()))
	mustOK(t, cerr, sr)
	_, cerr, sr = srv.Dial(t, web.ClientConfig(tdOther, mtls.WithLenientSANMatch()))
	mustFail(t, cerr, sr, "client", "is not the expected")
}

func TestOtherCARejected(t *testing.T) {
	ca, evil := mtlstest.NewCA(t), mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256)
	api := ca.Identity(t, "api", mtlstest.EC256)

	// Server leaf from another CA (with the right SPIFFE ID).
	fake := mtls.NewIdentity()
	c, k := evil.Leaf(t, ca.ID("api"), mtlstest.EC256)
	if err := fake.SetLeaf(c, k); err != nil {
		t.Fatal(err)
	}
	if err := fake.SetRoots(ca.TrustDomain, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, fake.ServerConfig())
	_, cerr, sr := srv.Dial(t, web.ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "client", "not trusted")

	// Client leaf from another CA.
	srv = startServer(t, api.ServerConfig())
	_, cerr, sr = srv.Dial(t, fake.ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "server", "client certificate")
	if !strings.Contains(sr.Err.Error(), "not trusted") {
		t.Errorf("server error %v; want 'not trusted'", sr.Err)
	}
}

func TestExpiredRejected(t *testing.T) {
	ca := mtlstest.NewCA(t)
	expired := func(svc string) *mtls.Identity {
		id := mtls.NewIdentity()
		c, k := ca.LeafWith(t, ca.ID(svc), mtlstest.EC256, mtlstest.LeafOptions{
			NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
		if err := id.SetLeaf(c, k); err != nil {
			t.Fatal(err)
		}
		if err := id.SetRoots(ca.TrustDomain, ca.RootPEM); err != nil {
			t.Fatal(err)
		}
		if st := id.Status(); st.Ready || !strings.Contains(st.Reason, "expired") {
			t.Errorf("status of expired identity = %+v", st)
		}
		return id
	}
	web := ca.Identity(t, "web", mtlstest.EC256)
	srv := startServer(t, expired("api").ServerConfig())
	_, cerr, sr := srv.Dial(t, web.ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "client", "expired")

	srv = startServer(t, ca.Identity(t, "api", mtlstest.EC256).ServerConfig())
	_, cerr, sr = srv.Dial(t, expired("web").ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "server", "expired")
}

func TestClientCertificateRequired(t *testing.T) {
	ca := mtlstest.NewCA(t)
	api := ca.Identity(t, "api", mtlstest.EC256)
	srv := startServer(t, api.ServerConfig())

	// No certificate at all.
	_, cerr, sr := srv.Dial(t, &tls.Config{InsecureSkipVerify: true})
	mustFail(t, cerr, sr, "server", "client didn't provide a certificate")

	// Trusted certificate, but no URI SAN.
	for name, o := range map[string]mtlstest.LeafOptions{
		"no URI SAN":      {NoURI: true},
		"agent identity":  {URI: "spiffe://" + ca.TrustDomain + "/agent/client/dc/dc1/id/node1"},
		"server-only EKU": {EKU: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
	} {
		t.Run(name, func(t *testing.T) {
			c, k := ca.LeafWith(t, ca.ID("web"), mtlstest.EC256, o)
			cert, err := tls.X509KeyPair(c, k)
			if err != nil {
				t.Fatal(err)
			}
			_, cerr, sr := srv.Dial(t, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
			mustFail(t, cerr, sr, "server", "client certificate")
		})
	}
}

func TestNotReadyRefuses(t *testing.T) {
	ca := mtlstest.NewCA(t)
	empty := mtls.NewIdentity()
	select {
	case <-empty.Ready():
		t.Fatal("empty identity is ready")
	default:
	}
	if st := empty.Status(); st.Ready || st.Reason == "" {
		t.Fatalf("status = %+v", st)
	}
	srv := startServer(t, empty.ServerConfig())
	_, cerr, sr := srv.Dial(t, ca.Identity(t, "web", mtlstest.EC256).ClientConfig(ca.ID("api")))
	mustFail(t, cerr, sr, "server", "no leaf certificate loaded yet")

	c, k := ca.Leaf(t, ca.ID("api"), mtlstest.EC256)
	if err := empty.SetLeaf(c, k); err != nil {
		t.Fatal(err)
	}
	if st := empty.Status(); st.Ready || !strings.Contains(st.Reason, "roots") {
		t.Fatalf("status = %+v", st)
	}
	if err := empty.SetRoots(ca.TrustDomain, []byte("garbage")); err == nil {
		t.Fatal("SetRoots accepted garbage")
	}
	if err := empty.SetRoots(ca.TrustDomain, ca.RootPEM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-empty.Ready():
	default:
		t.Fatal("not ready after leaf and roots")
	}
	if st := empty.Status(); !st.Ready || !st.LeafTrusts || st.ID != ca.ID("api").String() {
		t.Fatalf("status = %+v", st)
	}
	if empty.TrustDomain() != ca.TrustDomain || empty.ID().Datacenter != "dc1" {
		t.Fatalf("trust domain %q / id %v", empty.TrustDomain(), empty.ID())
	}
}

// TestRotation swaps leaves and roots under configs built once, as a
// running sidecar would see a CA rotation.
func TestRotation(t *testing.T) {
	oldCA, newCA := mtlstest.NewCA(t), mtlstest.NewCA(t)
	newCA.TrustDomain = oldCA.TrustDomain // same cluster, new root
	web := oldCA.Identity(t, "web", mtlstest.EC256)
	api := oldCA.Identity(t, "api", mtlstest.EC256)
	srv := startServer(t, api.ServerConfig())
	client := web.ClientConfig(oldCA.ID("api"))

	_, cerr, sr := srv.Dial(t, client)
	mustOK(t, cerr, sr)
	oldSerial := api.Leaf().Serial

	// Both sides learn the new root; the server gets its new leaf first.
	for _, id := range []*mtls.Identity{web, api} {
		if err := id.SetRoots(oldCA.TrustDomain, oldCA.RootPEM, newCA.RootPEM); err != nil {
			t.Fatal(err)
		}
	}
	c, k := newCA.Leaf(t, oldCA.ID("api"), mtlstest.EC256)
	if err := api.SetLeaf(c, k); err != nil {
		t.Fatal(err)
	}
	cs, cerr, sr := srv.Dial(t, client) // overlap: new server leaf, old client leaf
	mustOK(t, cerr, sr)
	if got := cs.PeerCertificates[0].SerialNumber; mtlsSerial(got.Bytes()) == oldSerial {
		t.Fatal("server still presents the old leaf")
	}

	// The old root goes away: the client's old leaf is now refused...
	if err := api.SetRoots(oldCA.TrustDomain, newCA.RootPEM); err != nil {
		t.Fatal(err)
	}
	_, cerr, sr = srv.Dial(t, client)
	mustFail(t, cerr, sr, "server", "not trusted")
	// ...until the client gets its new leaf, with the same config.
	c, k = newCA.Leaf(t, oldCA.ID("web"), mtlstest.EC256)
	if err := web.SetLeaf(c, k); err != nil {
		t.Fatal(err)
	}
	_, cerr, sr = srv.Dial(t, client)
	mustOK(t, cerr, sr)
}

func mtlsSerial(b []byte) string {
	const hexdigits = "0123456789abcdef"
	var s []byte
	for i, c := range b {
		if i > 0 {
			s = append(s, ':')
		}
		s = append(s, hexdigits[c>>4], hexdigits[c&0xf])
	}
	return string(s)
}

// TestResumption checks that a repeat connection resumes, that resumed
// handshakes still run verification against the current state, and that
// rotation turns stale sessions into full handshakes instead of failures.
func TestResumption(t *testing.T) {
	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			ca := mtlstest.NewCA(t)
			web := ca.Identity(t, "web", mtlstest.EC256)
			api := ca.Identity(t, "api", mtlstest.EC256)
			srv := startServer(t, api.ServerConfig())
			client := web.ClientConfig(ca.ID("api"))
			client.MaxVersion = v
			var resumedVerifies atomic.Int32
			verify := client.VerifyConnection
			client.VerifyConnection = func(cs tls.ConnectionState) error {
				if cs.DidResume {
					resumedVerifies.Add(1)
				}
				return verify(cs)
			}

			cs, cerr, sr := srv.Dial(t, client)
			mustOK(t, cerr, sr)
			if cs.DidResume {
				t.Fatal("first connection resumed")
			}
			cs, cerr, sr = srv.Dial(t, client)
			mustOK(t, cerr, sr)
			if !cs.DidResume || !sr.State.DidResume {
				t.Fatalf("second connection did not resume (client %v, server %v)", cs.DidResume, sr.State.DidResume)
			}
			if resumedVerifies.Load() != 1 {
				t.Fatalf("VerifyConnection ran %d times on resumed handshakes, want 1", resumedVerifies.Load())
			}
			if id, err := mtls.PeerID(sr.State); err != nil || id != ca.ID("web") {
				t.Fatalf("server PeerID on resumed conn = %v, %v", id, err)
			}

			// A per-instance config keeps its own sessions: first use is full.
			inst := mtls.InstanceConfig(client, "198.18.0.9:20000")
			cs, cerr, sr = srv.Dial(t, inst)
			mustOK(t, cerr, sr)
			if cs.DidResume {
				t.Fatal("instance config resumed another instance's session")
			}
			cs, cerr, sr = srv.Dial(t, inst)
			mustOK(t, cerr, sr)
			if !cs.DidResume {
				t.Fatal("instance config did not resume its own session")
			}

			// Server roots replaced: the client still offers its ticket, the
			// server declines it and does a full handshake (no failure).
			if err := api.SetRoots(ca.TrustDomain, ca.RootPEM); err != nil {
				t.Fatal(err)
			}
			cs, cerr, sr = srv.Dial(t, client)
			mustOK(t, cerr, sr)
			if cs.DidResume {
				t.Fatal("resumed a ticket issued under the previous root set")
			}
			cs, cerr, sr = srv.Dial(t, client)
			mustOK(t, cerr, sr)
			if !cs.DidResume {
				t.Fatal("no resumption after the new ticket")
			}

			// Client rotates its leaf: its old sessions are not offered.
			c, k := ca.Leaf(t, ca.ID("web"), mtlstest.EC256)
			if err := web.SetLeaf(c, k); err != nil {
				t.Fatal(err)
			}
			cs, cerr, sr = srv.Dial(t, client)
			mustOK(t, cerr, sr)
			if cs.DidResume {
				t.Fatal("resumed a session made with the previous leaf")
			}
			if got, _ := mtls.PeerID(sr.State); sr.State.PeerCertificates[0].SerialNumber.Cmp(web.Leaf().X509.SerialNumber) != 0 || got != ca.ID("web") {
				t.Fatal("server did not see the new client leaf")
			}
		})
	}
}

// TestResumedHandshakeReverified: a session whose server certificate is
// no longer acceptable (here: the server is no longer the expected
// identity) must fail even though the TLS layer resumes it.
func TestResumedHandshakeReverified(t *testing.T) {
	ca := mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256)
	api := ca.Identity(t, "api", mtlstest.EC256)
	srv := startServer(t, api.ServerConfig())
	good := web.ClientConfig(ca.ID("api"))
	_, cerr, sr := srv.Dial(t, good)
	mustOK(t, cerr, sr)

	// Same session cache, but expecting another identity: Go resumes, and
	// VerifyConnection must still reject.
	bad := web.ClientConfig(ca.ID("db"))
	bad.ServerName = good.ServerName
	bad.ClientSessionCache = good.ClientSessionCache
	_, cerr, sr = srv.Dial(t, bad)
	mustFail(t, cerr, sr, "client", "is not the expected")
	if !sr.State.DidResume {
		t.Fatal("server did not resume: the test did not exercise the resumed path")
	}
}

// TestKeyExchange pins the groups chosen in curves.go: our clients use
// P-256 (and get it without a HelloRetryRequest round trip); a peer that
// offers the post-quantum hybrid gets it; an X25519-only peer gets X25519.
func TestKeyExchange(t *testing.T) {
	ca := mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256)
	srv := startServer(t, ca.Identity(t, "api", mtlstest.EC256).ServerConfig())
	cs, cerr, sr := srv.Dial(t, web.ClientConfig(ca.ID("api")))
	mustOK(t, cerr, sr)
	if cs.CurveID != tls.CurveP256 || cs.HelloRetryRequest {
		t.Errorf("ferry client negotiated %v (HelloRetryRequest %v), want P-256 without a retry", cs.CurveID, cs.HelloRetryRequest)
	}
	x := web.ClientConfig(ca.ID("api"))
	x.CurvePreferences = []tls.CurveID{tls.X25519}
	cs, cerr, sr = srv.Dial(t, x)
	mustOK(t, cerr, sr)
	if cs.CurveID != tls.X25519 {
		t.Errorf("X25519-only client negotiated %v, want X25519", cs.CurveID)
	}
	pq := web.ClientConfig(ca.ID("api"))
	pq.CurvePreferences = nil // Go's default: X25519MLKEM768 first
	cs, cerr, sr = srv.Dial(t, pq)
	mustOK(t, cerr, sr)
	if cs.CurveID != tls.X25519MLKEM768 {
		t.Errorf("PQ-preferring client negotiated %v, want X25519MLKEM768", cs.CurveID)
	}
}

// TestConcurrentRotation swaps leaves and root sets while handshakes run
// (run with -race); every handshake must succeed since all leaves come from
// roots that stay trusted.
func TestConcurrentRotation(t *testing.T) {
	ca, ca2 := mtlstest.NewCA(t), mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256, ca2)
	api := ca.Identity(t, "api", mtlstest.EC256, ca2)
	srv := startServer(t, api.ServerConfig())
	client := web.ClientConfig(ca.ID("api"))
	leaves := make([][2][]byte, 4)
	for i := range leaves {
		issuer := ca
		if i%2 == 1 {
			issuer = ca2
		}
		leaves[i][0], leaves[i][1] = issuer.Leaf(t, ca.ID("api"), mtlstest.EC256)
	}
	stop := make(chan struct{})
	rotated := make(chan int)
	go func() {
		n := 0
		defer func() { rotated <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			l := leaves[n%len(leaves)]
			if err := api.SetLeaf(l[0], l[1]); err != nil {
				t.Error(err)
				return
			}
			if err := web.SetRoots(ca.TrustDomain, ca.RootPEM, ca2.RootPEM); err != nil {
				t.Error(err)
				return
			}
			n++
			time.Sleep(time.Millisecond)
		}
	}()
	for i := 0; i < 40; i++ {
		_, cerr, sr := srv.Dial(t, client)
		if cerr != nil || sr.Err != nil {
			close(stop)
			<-rotated
			t.Fatalf("handshake %d: client %v, server %v", i, cerr, sr.Err)
		}
	}
	close(stop)
	if n := <-rotated; n < 5 {
		t.Logf("only %d rotations happened during the handshakes", n)
	}
}

func TestClientOptions(t *testing.T) {
	ca := mtlstest.NewCA(t)
	web := ca.Identity(t, "web", mtlstest.EC256)
	srv := startServer(t, ca.Identity(t, "api", mtlstest.EC256).ServerConfig())

	noCache := web.ClientConfig(ca.ID("api"), mtls.WithSessionCacheSize(0))
	if noCache.ClientSessionCache != nil {
		t.Fatal("WithSessionCacheSize(0) kept a session cache")
	}
	if got := mtls.InstanceConfig(noCache, "x"); got != noCache {
		t.Fatal("InstanceConfig copied a config without a session cache")
	}
	for range 2 {
		cs, cerr, sr := srv.Dial(t, noCache)
		mustOK(t, cerr, sr)
		if cs.DidResume {
			t.Fatal("resumed without a session cache")
		}
	}

	// Peered / discovery-chain targets bring their own SNI; "" sends none
	// (as the built-in proxy does) and the server accepts either.
	for _, sni := range []string{"api.default.default.peer1.external.other.consul", ""} {
		cs, cerr, sr := srv.Dial(t, web.ClientConfig(ca.ID("api"), mtls.WithServerName(sni)))
		mustOK(t, cerr, sr)
		if sr.State.ServerName != sni || cs.ServerName != sni {
			t.Fatalf("SNI %q: server saw %q", sni, sr.State.ServerName)
		}
	}
}
