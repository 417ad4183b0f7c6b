package mtls_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
)

// scriptedAgent answers the two agent endpoints from a script, then blocks
// like an idle blocking query. It records the index each request sent.
type scriptedAgent struct {
	mu      sync.Mutex
	leaf    []func(w http.ResponseWriter)
	indexes []string
	times   []time.Time
	roots   api.CARootList
}

func (a *scriptedAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/v1/agent/connect/ca/roots":
		if r.URL.Query().Get("index") != "" {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", "3")
		_ = json.NewEncoder(w).Encode(a.roots)
	case r.URL.Path == "/v1/agent/connect/ca/leaf/web":
		a.mu.Lock()
		a.indexes = append(a.indexes, r.URL.Query().Get("index"))
		a.times = append(a.times, time.Now())
		var step func(http.ResponseWriter)
		if len(a.leaf) > 0 {
			step, a.leaf = a.leaf[0], a.leaf[1:]
		}
		a.mu.Unlock()
		if step == nil {
			<-r.Context().Done()
			return
		}
		step(w)
	default:
		http.NotFound(w, r)
	}
}

func leafResponse(index string, certPEM, keyPEM []byte) func(http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		w.Header().Set("X-Consul-Index", index)
		_ = json.NewEncoder(w).Encode(api.LeafCert{CertPEM: string(certPEM), PrivateKeyPEM: string(keyPEM), Service: "web"})
	}
}

// TestWatchIndexHygiene drives the watch loop through an error, a repeated
// index from an agent that does not block, an index going backwards and a
// bad certificate.
func TestWatchIndexHygiene(t *testing.T) {
	ca := mtlstest.NewCA(t)
	c1, k1 := ca.Leaf(t, ca.ID("web"), mtlstest.EC256)
	c2, k2 := ca.Leaf(t, ca.ID("web"), mtlstest.RSA2048)
	agent := &scriptedAgent{
		roots: api.CARootList{TrustDomain: ca.TrustDomain, Roots: []*api.CARoot{{ID: "r1", RootCertPEM: string(ca.RootPEM), Active: true}}},
	}
	var leafSet2 sync.WaitGroup
	leafSet2.Add(1)
	agent.leaf = []func(http.ResponseWriter){
		func(w http.ResponseWriter) { http.Error(w, "agent not ready", http.StatusInternalServerError) },
		leafResponse("10", c1, k1),
		leafResponse("10", c1, k1), // a non-blocking answer with the same index
		leafResponse("5", c2, k2),  // index went backwards
		func(w http.ResponseWriter) {
			leafResponse("12", []byte("garbage"), []byte("garbage"))(w)
			leafSet2.Done()
		},
	}
	srv := httptest.NewServer(agent)
	t.Cleanup(srv.Close)
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(srv.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}

	id := mtls.NewIdentity()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	const minInterval = 200 * time.Millisecond
	go func() {
		done <- id.Watch(ctx, client, "web", mtls.WatchOptions{
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MinInterval: minInterval,
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Watch did not return")
		}
	})

	select {
	case <-id.Ready():
	case <-time.After(5 * time.Second):
		t.Fatalf("not ready: %+v", id.Status())
	}
	leafSet2.Wait()
	testkit.EventuallyShow(t, 5*time.Second, "the request after the bad leaf", func() bool {
		agent.mu.Lock()
		defer agent.mu.Unlock()
		return len(agent.indexes) == 6
	}, func() any { return agent.indexes })

	agent.mu.Lock()
	got := strings.Join(agent.indexes, ",")
	gap := agent.times[3].Sub(agent.times[2])
	agent.mu.Unlock()
	// "" = no index: the first request and the retry after the error.
	if want := ",,10,10,5,12"; got != want {
		t.Fatalf("request indexes %q, want %q", got, want)
	}
	if gap < minInterval-10*time.Millisecond {
		t.Fatalf("repeated index re-requested after %v, want >= %v", gap, minInterval)
	}
	st := id.Status()
	if !st.Ready || !strings.Contains(st.LastError, "load leaf") {
		t.Fatalf("status after bad leaf = %+v", st)
	}
	if id.Leaf().X509.PublicKeyAlgorithm.String() != "RSA" {
		t.Fatalf("kept leaf %v, want the RSA one loaded before the bad one", id.Leaf().X509.PublicKeyAlgorithm)
	}
}

func TestWatchArgs(t *testing.T) {
	if err := mtls.NewIdentity().Watch(context.Background(), nil, "web", mtls.WatchOptions{}); err == nil {
		t.Fatal("Watch without client succeeded")
	}
}
