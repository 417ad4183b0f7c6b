package mtls_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/test/testbed"
)

// TestWatchConsul runs the watcher against a real `consul agent -dev`:
// first leaf and roots, a CA key-type rotation picked up without
// rebuilding TLS configs, and an agent restart (new CA, index going back).
func TestWatchConsul(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)

	baseG := runtime.NumGoroutine()
	tr := &http.Transport{}
	client, err := api.NewClient(&api.Config{Address: tb.Consul.HTTPAddr, Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	logger := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: testWriter{t}})
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
	srv := startServer(t, apiID.ServerConfig())
	clientCfg := web.ClientConfig(mtls.ServiceID(roots.TrustDomain, dc, "api"))
	_, cerr, sr := srv.dial(t, clientCfg)
	mustOK(t, cerr, sr)
	if id, _ := mtls.PeerID(sr.state); id != want {
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
		waitFor(t, 10*time.Second, "two roots", func() bool {
			return len(id.Roots().Certs) >= 2
		}, func() any { return id.Status() })
	}
	t.Logf("new roots picked up %v after the CA change", time.Since(rotated))
	for _, id := range []*mtls.Identity{web, apiID} {
		waitFor(t, 45*time.Second, "leaf signed by the new RSA root", func() bool {
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
	cs, cerr, sr := srv.dial(t, clientCfg)
	mustOK(t, cerr, sr)
	if alg := cs.PeerCertificates[0].SignatureAlgorithm; alg != x509.SHA256WithRSA {
		t.Fatalf("server presented a leaf signed with %v after rotation, want SHA256-RSA", alg)
	}
	// A peer still on its old leaf (old root) is accepted during the overlap.
	_, cerr, sr = srv.dial(t, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{*oldLeaf.Cert}})
	mustOK(t, cerr, sr)

	// Agent restart: a dev agent comes back with a new CA and trust domain
	// and lower indexes. The watch must recover on its own.
	oldTD := web.TrustDomain()
	tb.Consul.Stop()
	if err := tb.Consul.Start(); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	waitFor(t, 30*time.Second, "new trust domain after agent restart", func() bool {
		return web.TrustDomain() != oldTD && web.ID().TrustDomain == web.TrustDomain()
	}, func() any { return web.Status() })
	t.Logf("identity followed the restarted agent after %v", time.Since(restarted))

	stop()
	tr.CloseIdleConnections()
	waitFor(t, 10*time.Second, "watch goroutines gone", func() bool {
		return runtime.NumGoroutine() <= baseG+2 // tolerance: runtime/test helpers
	}, func() any { return runtime.NumGoroutine() })
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool, state func() any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; state: %+v", d, what, state())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
