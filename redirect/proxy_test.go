package redirect

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// fakeAgent serves the three Consul HTTP endpoints LookupProxy uses, over
// a real loopback HTTP server and the real consul/api client.
func fakeAgent(t *testing.T, services map[string]*api.AgentService, checks map[string]*api.AgentCheck) *api.Client {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/agent/service/", func(w http.ResponseWriter, r *http.Request) {
		svc, ok := services[strings.TrimPrefix(r.URL.Path, "/v1/agent/service/")]
		if !ok {
			http.Error(w, "unknown service ID", http.StatusNotFound)
			return
		}
		_ = json.NewEncoder(w).Encode(svc)
	})
	mux.HandleFunc("/v1/agent/checks", func(w http.ResponseWriter, r *http.Request) {
		want := `ServiceName == "web"`
		if f := r.URL.Query().Get("filter"); f != want {
			http.Error(w, "unexpected filter "+f, http.StatusBadRequest)
			return
		}
		_ = json.NewEncoder(w).Encode(checks)
	})
	mux.HandleFunc("/v1/catalog/node-services/", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if _, ok := q["merge-central-config"]; !ok {
			http.Error(w, "merge-central-config missing", http.StatusBadRequest)
			return
		}
		list := &api.CatalogNodeServiceList{Node: &api.Node{Node: strings.TrimPrefix(r.URL.Path, "/v1/catalog/node-services/")}}
		for id, s := range services {
			if q.Get("filter") == `ID == "`+id+`"` {
				list.Services = append(list.Services, s)
			}
		}
		_ = json.NewEncoder(w).Encode(list)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	cfg := api.DefaultConfig()
	cfg.Address = strings.TrimPrefix(srv.URL, "http://")
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func proxySvc(port int, cfg map[string]any, tp *api.TransparentProxyConfig, expose api.ExposeConfig) *api.AgentService {
	return &api.AgentService{
		Kind: api.ServiceKindConnectProxy, ID: "web-sidecar-proxy", Service: "web-sidecar-proxy", Port: port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", Config: cfg, TransparentProxy: tp, Expose: expose},
	}
}

func TestLookupProxy(t *testing.T) {
	checks := map[string]*api.AgentCheck{
		"service:web:2": {CheckID: "service:web:2", ExposedPort: 21501},
		"service:web:1": {CheckID: "service:web:1", ExposedPort: 21500},
		"service:web:3": {CheckID: "service:web:3"},
	}
	cases := []struct {
		name       string
		svc        *api.AgentService
		node       string
		in, out    string
		excl       []string
		errSubstr  string
		inboundSrc string
	}{
		{name: "defaults", svc: proxySvc(21000, nil, nil, api.ExposeConfig{}), in: "21000", out: "15001", inboundSrc: "service port"},
		{name: "bind_port number and outbound", svc: proxySvc(21000, map[string]any{"bind_port": 20000}, &api.TransparentProxyConfig{OutboundListenerPort: 15002}, api.ExposeConfig{}),
			in: "20000", out: "15002", inboundSrc: "bind_port"},
		{name: "bind_port string (weak decode)", svc: proxySvc(21000, map[string]any{"bind_port": "20001"}, nil, api.ExposeConfig{}), in: "20001", out: "15001"},
		{name: "all exclusions in Consul's order", svc: proxySvc(21000, map[string]any{
			"envoy_stats_bind_addr":      "0.0.0.0:9102",
			"envoy_prometheus_bind_addr": "0.0.0.0:20200",
		}, nil, api.ExposeConfig{Checks: true, Paths: []api.ExposePath{{ListenerPort: 20300, Path: "/live"}, {Path: "/no-port"}, {ListenerPort: 20400}}}),
			in: "21000", out: "15001", excl: []string{"20200", "9102", "20300", "20400", "21500", "21501"}},
		{name: "node-name skips checks", node: "node-1", svc: proxySvc(21000, nil, nil, api.ExposeConfig{Checks: true, Paths: []api.ExposePath{{ListenerPort: 20300}}}),
			in: "21000", out: "15001", excl: []string{"20300"}},
		{name: "not a proxy", svc: &api.AgentService{ID: "web-sidecar-proxy", Service: "web", Port: 8080}, errSubstr: "not a proxy service"},
		{name: "bad stats addr", svc: proxySvc(21000, map[string]any{"envoy_stats_bind_addr": "9102"}, nil, api.ExposeConfig{}), errSubstr: "envoy_stats_bind_addr"},
		{name: "bad bind_port", svc: proxySvc(21000, map[string]any{"bind_port": "x"}, nil, api.ExposeConfig{}), errSubstr: "bind_port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := fakeAgent(t, map[string]*api.AgentService{"web-sidecar-proxy": tc.svc}, checks)
			ps, err := LookupProxy(context.Background(), c, "web-sidecar-proxy", tc.node)
			if tc.errSubstr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errSubstr) {
					t.Fatalf("got %v, want error containing %q", err, tc.errSubstr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ps.InboundPort.Value != tc.in || ps.OutboundPort.Value != tc.out {
				t.Errorf("ports %q/%q, want %s/%s", ps.InboundPort.Value, ps.OutboundPort.Value, tc.in, tc.out)
			}
			if tc.inboundSrc != "" && !strings.Contains(ps.InboundPort.Source, tc.inboundSrc) {
				t.Errorf("inbound source %q", ps.InboundPort.Source)
			}
			var got []string
			for _, i := range ps.ExcludeInboundPorts {
				got = append(got, i.Value)
			}
			if !slices.Equal(got, tc.excl) {
				t.Errorf("excluded %q, want %q", got, tc.excl)
			}
		})
	}
	t.Run("unknown id", func(t *testing.T) {
		c := fakeAgent(t, nil, nil)
		if _, err := LookupProxy(context.Background(), c, "nope", ""); err == nil {
			t.Fatal("want error")
		}
		if _, err := LookupProxy(context.Background(), c, "nope", "node-1"); err == nil || !strings.Contains(err.Error(), "not found") {
			t.Fatalf("got %v", err)
		}
	})
}
