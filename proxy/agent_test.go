package proxy

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestEndpointsFromService(t *testing.T) {
	px := func(mod func(*api.AgentService)) *api.AgentService {
		s := &api.AgentService{
			Kind: api.ServiceKindConnectProxy, ID: "web-sidecar-proxy", Service: "web-sidecar-proxy",
			Port: 20000, Address: "198.18.0.5",
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: "web", DestinationServiceID: "web",
				LocalServiceAddress: "127.0.0.1", LocalServicePort: 8080,
				Mode: api.ProxyModeTransparent,
			},
		}
		if mod != nil {
			mod(s)
		}
		return s
	}
	for _, tc := range []struct {
		name    string
		svc     *api.AgentService
		want    Endpoints
		wantErr string
	}{
		{"defaults", px(nil), Endpoints{"0.0.0.0:20000", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"bind_port as JSON number", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_port": float64(21000)} }),
			Endpoints{"0.0.0.0:21000", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"bind_port as string", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_port": "21001"} }),
			Endpoints{"0.0.0.0:21001", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"bind_address", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_address": "198.18.0.5"} }),
			Endpoints{"198.18.0.5:20000", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"outbound port", px(func(s *api.AgentService) {
			s.Proxy.TransparentProxy = &api.TransparentProxyConfig{OutboundListenerPort: 15101}
		}), Endpoints{"0.0.0.0:20000", "127.0.0.1:15101", "127.0.0.1:8080"}, ""},
		{"zero outbound port means default", px(func(s *api.AgentService) {
			s.Proxy.TransparentProxy = &api.TransparentProxyConfig{DialedDirectly: true}
		}), Endpoints{"0.0.0.0:20000", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"local address default", px(func(s *api.AgentService) { s.Proxy.LocalServiceAddress = "" }),
			Endpoints{"0.0.0.0:20000", "127.0.0.1:15001", "127.0.0.1:8080"}, ""},
		{"ipv6 local address", px(func(s *api.AgentService) { s.Proxy.LocalServiceAddress = "::1" }),
			Endpoints{"0.0.0.0:20000", "127.0.0.1:15001", "[::1]:8080"}, ""},
		{"nil", nil, Endpoints{}, "no service registration"},
		{"not a proxy", px(func(s *api.AgentService) { s.Kind = "" }), Endpoints{}, "not a connect-proxy"},
		{"no proxy block", px(func(s *api.AgentService) { s.Proxy = nil }), Endpoints{}, "no Proxy block"},
		{"no port", px(func(s *api.AgentService) { s.Port = 0 }), Endpoints{}, "no valid inbound port"},
		{"bad bind_port", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_port": 70000.0} }), Endpoints{}, "out of range"},
		{"fractional bind_port", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_port": 2.5} }), Endpoints{}, "not an integer"},
		{"bind_port wrong type", px(func(s *api.AgentService) { s.Proxy.Config = map[string]any{"bind_port": true} }), Endpoints{}, "unexpected type"},
		{"no local port", px(func(s *api.AgentService) { s.Proxy.LocalServicePort = 0 }), Endpoints{}, "LocalServicePort"},
		{"socket path", px(func(s *api.AgentService) { s.Proxy.LocalServiceSocketPath = "/run/app.sock" }), Endpoints{}, "unix-socket"},
		{"bad outbound port", px(func(s *api.AgentService) {
			s.Proxy.TransparentProxy = &api.TransparentProxyConfig{OutboundListenerPort: 99999}
		}), Endpoints{}, "OutboundListenerPort"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := EndpointsFromService(tc.svc)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestFindSidecar(t *testing.T) {
	svcs := map[string]*api.AgentService{
		"web":               {ID: "web", Service: "web"},
		"web-sidecar-proxy": {ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceID: "web"}},
		"api-1-proxy":       {ID: "api-1-proxy", Kind: api.ServiceKindConnectProxy, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceID: "api"}},
		"api-2-proxy":       {ID: "api-2-proxy", Kind: api.ServiceKindConnectProxy, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceID: "API"}},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/agent/services" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(svcs)
	}))
	defer srv.Close()
	c, err := api.NewClient(&api.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	if id, err := FindSidecar(c.Agent(), "WEB"); err != nil || id != "web-sidecar-proxy" {
		t.Fatalf("FindSidecar(WEB) = %q, %v", id, err)
	}
	if _, err := FindSidecar(c.Agent(), "db"); err == nil || !strings.Contains(err.Error(), "no connect-proxy") {
		t.Fatalf("FindSidecar(db): %v", err)
	}
	if _, err := FindSidecar(c.Agent(), "api"); err == nil || !strings.Contains(err.Error(), "2 proxies") {
		t.Fatalf("FindSidecar(api): %v", err)
	}
}
