package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// TestCatalogRegistrationWatch: the agentless registration is read from
// the catalog with merge-central-config and a filter on the ID, blocking on
// the index; every change is delivered once, with the node's datacenter;
// while the proxy is not registered yet, ferry blocks until it is.
func TestCatalogRegistrationWatch(t *testing.T) {
	var mu sync.Mutex
	index := uint64(10)
	port := 0 // 0: not registered
	changed := make(chan struct{})
	var queries []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/catalog/node-services/n1-virtual" {
			http.NotFound(w, r)
			return
		}
		q := r.URL.Query()
		mu.Lock()
		queries = append(queries, r.URL.RawQuery)
		if wi, _ := strconv.ParseUint(q.Get("index"), 10, 64); wi >= index {
			ch := changed
			mu.Unlock()
			select {
			case <-ch:
			case <-r.Context().Done():
				return
			}
			mu.Lock()
		}
		out := api.CatalogNodeServiceList{Node: &api.Node{Node: "n1-virtual", Datacenter: "dc7"}}
		if port != 0 {
			out.Services = []*api.AgentService{{Kind: api.ServiceKindConnectProxy, ID: "p1", Service: "web-sidecar-proxy",
				Port: port, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", LocalServicePort: 8080}}}
		}
		w.Header().Set("X-Consul-Index", strconv.FormatUint(index, 10))
		mu.Unlock()
		json.NewEncoder(w).Encode(out)
	}))
	defer srv.Close()
	update := func(p int) {
		mu.Lock()
		port = p
		index++
		close(changed)
		changed = make(chan struct{})
		mu.Unlock()
	}

	cfg := api.DefaultNonPooledConfig()
	cfg.Address = srv.Listener.Addr().String()
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	reg := CatalogRegistration{Client: client, Node: "n1-virtual", ID: "p1"}
	got := make(chan *api.AgentService, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		reg.Watch(ctx, hclog.NewNullLogger(), func(s *api.AgentService) { got <- s })
	}()
	next := func() *api.AgentService {
		t.Helper()
		select {
		case s := <-got:
			return s
		case <-time.After(5 * time.Second):
			t.Fatal("no registration delivered")
			return nil
		}
	}
	select {
	case s := <-got:
		t.Fatalf("delivered %v before it is registered", s)
	case <-time.After(200 * time.Millisecond):
	}
	update(20000)
	if s := next(); s.Port != 20000 || s.Datacenter != "dc7" {
		t.Fatalf("first: port %d dc %q", s.Port, s.Datacenter)
	}
	update(21000)
	if s := next(); s.Port != 21000 {
		t.Fatalf("second: port %d", s.Port)
	}
	cancel()
	<-done

	mu.Lock()
	defer mu.Unlock()
	for _, q := range queries {
		v, _ := url.ParseQuery(q)
		_, merge := v["merge-central-config"]
		_, stale := v["stale"]
		if !merge || !stale || v.Get("filter") != `ID == "p1"` {
			t.Fatalf("query %q: want merge-central-config, stale and the ID filter", q)
		}
	}
}
