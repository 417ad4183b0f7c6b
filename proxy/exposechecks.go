package proxy

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/proxy/expose"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// Expose.Checks in agent mode, as Consul 1.14 does it: when the proxy
// registration asks for it, the local agent gives each HTTP and gRPC check
// of the destination service a port from expose_min_port..expose_max_port
// (21500-21755), and runs the check against <proxy address>:<that port>
// instead of its own target (agent.go rerouteExposedChecks). Envoy serves
// those ports with a listener per check (xds parseCheckPath), open only to
// 127.0.0.0/8, ::1 and the agent's advertise address.
//
// The agent's HTTP API gives each such check's port (ExposedPort in
// /v1/agent/checks) but not its original target: Definition is empty for
// checks registered with a service. So ferry cannot tell which local port
// and path the check named, and its listener forwards whatever the agent
// asks (the check's own path) to the service's port, LocalServicePort. A
// check on another port of the app must be an Expose.Paths entry instead.

// exposeChecksPoll is how often ferry re-reads the agent's checks: a check
// added to the service, or a port the agent allocates, shows no change in
// the proxy's registration.
const exposeChecksPoll = 5 * time.Second

// checkExposer keeps the agent's exposed checks of the current
// registration.
type checkExposer struct {
	agent *api.Agent
	log   hclog.Logger

	mu      sync.Mutex
	svc     *api.AgentService // the registration, when Expose.Checks is on
	sources []netip.Prefix    // loopback and the agent's address, once known
}

// set records the registration; it reports whether checks are exposed.
func (c *checkExposer) set(svc *api.AgentService) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.svc = nil
	if svc.Proxy != nil && svc.Proxy.Expose.Checks {
		c.svc = svc
	}
	return c.svc != nil
}

// paths returns a listener for each exposed HTTP or gRPC check of the
// destination service, or nil when the registration does not ask for it.
func (c *checkExposer) paths(ctx context.Context) ([]expose.Path, error) {
	c.mu.Lock()
	svc, sources := c.svc, c.sources
	c.mu.Unlock()
	if svc == nil {
		return nil, nil
	}
	if sources == nil {
		var err error
		if sources, err = c.agentSources(); err != nil {
			return nil, err
		}
		c.mu.Lock()
		c.sources = sources
		c.mu.Unlock()
	}
	dest := svc.Proxy.DestinationServiceID
	if dest == "" {
		dest = svc.Proxy.DestinationServiceName
	}
	q := (&api.QueryOptions{}).WithContext(ctx)
	checks, err := c.agent.ChecksWithFilterOpts(fmt.Sprintf("ServiceID == %q", dest), q)
	if err != nil {
		return nil, fmt.Errorf("expose checks: reading the agent's checks of %s: %w", dest, err)
	}
	var out []expose.Path
	for _, ch := range checks {
		if ch.ExposedPort <= 0 {
			continue
		}
		p := expose.Path{ListenerPort: ch.ExposedPort, AnyPath: true, LocalPathPort: svc.Proxy.LocalServicePort,
			LocalAddress: svc.Proxy.LocalServiceAddress, Sources: sources}
		switch ch.Type {
		case "http":
			p.Protocol = "http"
		case "grpc":
			p.Protocol = "http2"
		default:
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

// agentSources are the clients Consul lets reach a check listener.
func (c *checkExposer) agentSources() ([]netip.Prefix, error) {
	self, err := c.agent.Self()
	if err != nil {
		return nil, fmt.Errorf("expose checks: reading the agent's address: %w", err)
	}
	out := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	if s, _ := self["Member"]["Addr"].(string); s != "" {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("expose checks: agent address %q: %w", s, err)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}
