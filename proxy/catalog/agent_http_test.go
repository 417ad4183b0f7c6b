package catalog

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// fakeAgent serves the HTTP endpoints the view reads, with blocking-query
// semantics on a catalog that never changes, and answers the instances of
// "backend" in datacenter "dc-typo" with Consul's 500 for an unknown
// datacenter. It records node dumps, failures and reads missing ?stale.
type fakeAgent struct {
	srv      *httptest.Server
	dumps    atomic.Int64
	failures atomic.Int64
	mu       sync.Mutex
	notStale map[string]int // path -> reads without ?stale
}

func startFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	a := &fakeAgent{notStale: map[string]int{}}
	const index = 42
	block := func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/agent/self" && !r.URL.Query().Has("stale") {
			a.mu.Lock()
			a.notStale[r.URL.Path]++
			a.mu.Unlock()
		}
		if idx, _ := strconv.Atoi(r.URL.Query().Get("index")); idx >= index {
			wait, err := time.ParseDuration(r.URL.Query().Get("wait"))
			if err != nil {
				wait = time.Minute
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(wait):
			}
		}
		w.Header().Set("X-Consul-Index", strconv.Itoa(index))
		w.Header().Set("Content-Type", "application/json")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/agent/self", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"Config":{"Datacenter":"dc1"}}`))
	})
	mux.HandleFunc("/v1/catalog/services", func(w http.ResponseWriter, r *http.Request) {
		block(w, r)
		w.Write([]byte(`{"consul":[]}`))
	})
	mux.HandleFunc("/v1/internal/ui/nodes", func(w http.ResponseWriter, r *http.Request) {
		a.dumps.Add(1)
		block(w, r)
		w.Write([]byte(`[{"Node":"n1","Address":"198.18.0.1","Services":[{"Kind":"connect-proxy","ID":"web-proxy",
			"Service":"web-sidecar-proxy","TaggedAddresses":{"consul-virtual":{"Address":"240.0.0.1"}},
			"Proxy":{"DestinationServiceName":"web"}}]}]`))
	})
	mux.HandleFunc("/v1/config/", func(w http.ResponseWriter, r *http.Request) {
		block(w, r)
		w.Write([]byte(`[]`))
	})
	mux.HandleFunc("/v1/health/connect/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("dc") == "dc-typo" {
			a.failures.Add(1)
			http.Error(w, "No path to datacenter", http.StatusInternalServerError)
			return
		}
		block(w, r)
		w.Write([]byte(`[]`))
	})
	a.srv = httptest.NewServer(mux)
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAgent) source(t *testing.T) ConsulSource {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: a.srv.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	return ConsulSource{Client: c}
}

// The audit's TestAuditFailingWatchForcesBulkRereads against the real HTTP
// client: one upstream in a misspelled datacenter fails with 500 "No path
// to datacenter" on every retry. Over a window with no catalog change the
// node dump must be read once (the initial), while that watch retries with
// backoff; every server read is stale.
func TestFailingUpstreamDatacenterReadsDumpOnce(t *testing.T) {
	a := startFakeAgent(t)
	v := Start(context.Background(), a.source(t), Options{RetryMin: 10 * time.Millisecond, RetryMax: 40 * time.Millisecond,
		MinInterval: time.Millisecond})
	t.Cleanup(func() { v.Close() })
	waitReady(t, v)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := v.Instances(ctx, Service{Name: "backend", Datacenter: "dc-typo"}); err == nil {
		t.Fatal("instances in an unknown datacenter: no error")
	}
	f0 := a.failures.Load()
	time.Sleep(1500 * time.Millisecond) // the window; the counts are what is tested
	failures := a.failures.Load() - f0
	if failures < 10 {
		t.Fatalf("%d failing fetches in 1.5s: the watch is not retrying", failures)
	}
	if n := a.dumps.Load(); n != 1 {
		t.Errorf("node dumps = %d over %d failing fetches with no catalog change; want 1", n, failures)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.notStale) > 0 {
		t.Errorf("server reads without ?stale: %v", a.notStale)
	}
}

// The error chains of the real HTTP client: an HTTP answer is about the
// query; a refused connection is the agent gone.
func TestAgentGoneRealClient(t *testing.T) {
	a := startFakeAgent(t)
	_, _, err := a.source(t).Connect(context.Background(), "backend", Query{Datacenter: "dc-typo"})
	if err == nil || agentGone(err) {
		t.Errorf("500 No path to datacenter: err %v, agentGone %v; want an error, not agent gone", err, err != nil && agentGone(err))
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c, err := api.NewClient(&api.Config{Address: addr})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ConsulSource{Client: c}.ServicesIndex(context.Background(), Query{})
	if err == nil || !agentGone(err) {
		t.Errorf("connection refused: err %v; want agent gone", err)
	}
}
