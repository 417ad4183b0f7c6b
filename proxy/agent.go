package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// DefaultOutboundPort is Consul's default TransparentProxy.OutboundListenerPort.
const DefaultOutboundPort = 15001

// EndpointsFromService derives the proxy's endpoints from its registration
// as returned by the local agent (central config already merged):
//
//	inbound   Proxy.Config.bind_address (default 0.0.0.0) : Proxy.Config.bind_port, else the proxy's Port
//	outbound  127.0.0.1 : TransparentProxy.OutboundListenerPort, else 15001
//	local app Proxy.LocalServiceAddress (default 127.0.0.1) : Proxy.LocalServicePort
func EndpointsFromService(svc *api.AgentService) (Endpoints, error) {
	if svc == nil {
		return Endpoints{}, errors.New("no service registration")
	}
	if svc.Kind != api.ServiceKindConnectProxy {
		return Endpoints{}, fmt.Errorf("service %q is of kind %q, not a connect-proxy", svc.ID, svc.Kind)
	}
	px := svc.Proxy
	if px == nil {
		return Endpoints{}, fmt.Errorf("proxy %q has no Proxy block", svc.ID)
	}
	if px.LocalServiceSocketPath != "" {
		return Endpoints{}, fmt.Errorf("proxy %q: unix-socket local services are not supported", svc.ID)
	}

	inPort := svc.Port
	if v, ok := px.Config["bind_port"]; ok {
		p, err := portValue(v)
		if err != nil {
			return Endpoints{}, fmt.Errorf("proxy %q: Proxy.Config.bind_port: %w", svc.ID, err)
		}
		inPort = p
	}
	if inPort <= 0 || inPort > 65535 {
		return Endpoints{}, fmt.Errorf("proxy %q: no valid inbound port (Port=%d, no bind_port)", svc.ID, svc.Port)
	}
	inAddr := "0.0.0.0"
	if v, ok := px.Config["bind_address"].(string); ok && v != "" {
		inAddr = v
	}

	outPort := DefaultOutboundPort
	if px.TransparentProxy != nil && px.TransparentProxy.OutboundListenerPort != 0 {
		outPort = px.TransparentProxy.OutboundListenerPort
	}
	if outPort < 0 || outPort > 65535 {
		return Endpoints{}, fmt.Errorf("proxy %q: bad OutboundListenerPort %d", svc.ID, outPort)
	}

	if px.LocalServicePort <= 0 || px.LocalServicePort > 65535 {
		return Endpoints{}, fmt.Errorf("proxy %q: no valid LocalServicePort (%d)", svc.ID, px.LocalServicePort)
	}
	appAddr := px.LocalServiceAddress
	if appAddr == "" {
		appAddr = "127.0.0.1"
	}
	return Endpoints{
		Inbound:  net.JoinHostPort(inAddr, strconv.Itoa(inPort)),
		Outbound: net.JoinHostPort("127.0.0.1", strconv.Itoa(outPort)),
		LocalApp: net.JoinHostPort(appAddr, strconv.Itoa(px.LocalServicePort)),
	}, nil
}

// portValue accepts the shapes an opaque JSON config gives a port: a
// number (float64 after decoding) or a numeric string.
func portValue(v any) (int, error) {
	var p int
	switch t := v.(type) {
	case float64:
		if t != float64(int(t)) {
			return 0, fmt.Errorf("%v is not an integer", t)
		}
		p = int(t)
	case int:
		p = t
	case int64:
		p = int(t)
	case string:
		n, err := strconv.Atoi(strings.TrimSpace(t))
		if err != nil {
			return 0, fmt.Errorf("%q is not a number", t)
		}
		p = n
	default:
		return 0, fmt.Errorf("unexpected type %T", v)
	}
	if p <= 0 || p > 65535 {
		return 0, fmt.Errorf("%d is out of range", p)
	}
	return p, nil
}

// FindSidecar returns the ID of the one connect-proxy registered with the
// local agent whose DestinationServiceID is serviceID (case-insensitive,
// like `consul connect proxy -sidecar-for`).
func FindSidecar(agent *api.Agent, serviceID string) (string, error) {
	svcs, err := agent.Services()
	if err != nil {
		return "", fmt.Errorf("sidecar for %q: list agent services: %w", serviceID, err)
	}
	var found []string
	for id, s := range svcs {
		if s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil &&
			strings.EqualFold(s.Proxy.DestinationServiceID, serviceID) {
			found = append(found, id)
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("sidecar for %q: no connect-proxy registered for it", serviceID)
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("sidecar for %q: %d proxies registered (%s); use -proxy-id", serviceID, len(found), strings.Join(found, ", "))
}

// WatchService follows the agent's registration of service id with
// hash-based blocking queries and calls fn with every new version (the
// first one included). Errors are logged and retried with backoff (1 s
// doubling to 30 s); it returns when ctx is done.
func WatchService(ctx context.Context, agent *api.Agent, id string, log hclog.Logger, fn func(*api.AgentService)) {
	var hash string
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitHash: hash, WaitTime: 5 * time.Minute}).WithContext(ctx)
		svc, meta, err := agent.Service(id, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, time.Second), 30*time.Second)
			log.Warn("reading proxy registration failed, retrying", "error", err, "backoff", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		changed := meta.LastContentHash != hash || hash == ""
		hash = meta.LastContentHash
		if changed {
			fn(svc)
		}
		if hash == "" {
			// An agent that sends no content hash cannot block; poll.
			select {
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Second):
			}
		}
	}
}
