package testbed

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/hashicorp/consul/api"
)

// Service describes a service in a pod and (unless NoSidecar) its sidecar
// proxy, registered as consul-k8s would: transparent mode, sidecar on the pod
// IP at port 20000, app on 127.0.0.1:Port.
type Service struct {
	Name string
	Pod  *Pod
	// Address is the instance address of the service and its sidecar;
	// default Pod.IP (e.g. Pod.IP6 for an IPv6 instance).
	Address netip.Addr
	// Port is the app's port (LocalServicePort).
	Port int
	// SidecarPort is the proxy's public port; default 20000.
	SidecarPort    int
	Upstreams      []api.Upstream
	ProxyConfig    map[string]any
	DialedDirectly bool
	NoSidecar      bool
	// TaggedAddresses go on both the service and its sidecar, as
	// consul-k8s registers a ClusterIP as the "virtual" tagged address.
	TaggedAddresses map[string]api.ServiceAddress
	// Direct registers the sidecar in the default (non-transparent) mode.
	Direct bool
	// Native registers a connect-native service (its app speaks mTLS on
	// Port at the pod's address) and no sidecar.
	Native bool
	// Expose goes on the sidecar (Expose.Paths: the probes' listeners).
	Expose api.ExposeConfig
}

// Registered names what Register created.
type Registered struct{ ID, ProxyID string }

// Register registers s with the agent and deregisters it at cleanup.
func (tb *Testbed) Register(t testing.TB, s Service) Registered {
	t.Helper()
	r, err := tb.RegisterService(s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tb.Deregister(r) })
	return r
}

// RegisterService is Register for callers without a testing.TB.
func (tb *Testbed) RegisterService(s Service) (Registered, error) {
	agent := tb.Consul.Client.Agent()
	r := Registered{ID: s.Name + "-" + s.Pod.Name}
	addr := s.Pod.IP
	if s.Address.IsValid() {
		addr = s.Address
	}
	// No health checks: an instance without checks is passing, so tests
	// control health by registering and deregistering.
	if err := agent.ServiceRegister(&api.AgentServiceRegistration{
		ID:              r.ID,
		Name:            s.Name,
		Port:            s.Port,
		Address:         addr.String(),
		TaggedAddresses: s.TaggedAddresses,
		Connect:         native(s.Native),
	}); err != nil {
		return r, fmt.Errorf("testbed: register %s: %w", r.ID, err)
	}
	if s.NoSidecar || s.Native {
		return r, nil
	}
	port := s.SidecarPort
	if port == 0 {
		port = 20000
	}
	mode := api.ProxyModeTransparent
	if s.Direct {
		mode = api.ProxyModeDefault
	}
	r.ProxyID = r.ID + "-sidecar-proxy"
	err := agent.ServiceRegister(&api.AgentServiceRegistration{
		Kind:            api.ServiceKindConnectProxy,
		ID:              r.ProxyID,
		Name:            s.Name + "-sidecar-proxy",
		Port:            port,
		Address:         addr.String(),
		TaggedAddresses: s.TaggedAddresses,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: s.Name,
			DestinationServiceID:   r.ID,
			LocalServiceAddress:    "127.0.0.1",
			LocalServicePort:       s.Port,
			Mode:                   mode,
			TransparentProxy:       &api.TransparentProxyConfig{DialedDirectly: s.DialedDirectly},
			Upstreams:              s.Upstreams,
			Config:                 s.ProxyConfig,
			Expose:                 s.Expose,
		},
	})
	if err != nil {
		return r, fmt.Errorf("testbed: register %s: %w", r.ProxyID, err)
	}
	return r, nil
}

func native(on bool) *api.AgentServiceConnect {
	if !on {
		return nil
	}
	return &api.AgentServiceConnect{Native: true}
}

// Deregister removes what RegisterService added; errors are ignored because
// the agent may already be gone at cleanup.
func (tb *Testbed) Deregister(r Registered) {
	agent := tb.Consul.Client.Agent()
	if r.ProxyID != "" {
		agent.ServiceDeregister(r.ProxyID)
	}
	agent.ServiceDeregister(r.ID)
}

// VirtualIP returns the Consul-assigned virtual IP (consul-virtual tagged
// address) of a service with a registered sidecar.
func (tb *Testbed) VirtualIP(service string) (string, error) {
	entries, _, err := tb.Consul.Client.Catalog().Connect(service, "", nil)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if a, ok := e.ServiceTaggedAddresses["consul-virtual"]; ok && a.Address != "" {
			return a.Address, nil
		}
	}
	return "", fmt.Errorf("testbed: %s has no consul-virtual address yet", service)
}
