package redirect

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"sort"
	"strconv"

	"github.com/hashicorp/consul/api"
)

// ProxySettings is what a proxy registration contributes to a Config
// (consul connect redirect-traffic -proxy-id).
type ProxySettings struct {
	InboundPort         Item
	OutboundPort        Item
	ExcludeInboundPorts []Item
}

// LookupProxy reads the proxy's registration and derives the ports the way
// `consul connect redirect-traffic -proxy-id` does:
//   - inbound: Proxy.Config bind_port, else the service port;
//   - outbound: TransparentProxy.OutboundListenerPort, else 15001;
//   - excluded inbound, in this order: the envoy_prometheus_bind_addr port,
//     the envoy_stats_bind_addr port, every Expose.Paths listener port, and,
//     with Expose.Checks (agent lookups only), the exposed port of each of
//     the destination service's checks. Consul ranges over a map there;
//     ferry sorts by check ID so the plan is deterministic.
//
// With nodeName set the registration comes from the catalog (merged with
// central config), as for agentless deployments.
func LookupProxy(ctx context.Context, client *api.Client, proxyID, nodeName string) (ProxySettings, error) {
	q := (&api.QueryOptions{}).WithContext(ctx)
	var svc *api.AgentService
	if nodeName == "" {
		s, _, err := client.Agent().Service(proxyID, q)
		if err != nil {
			return ProxySettings{}, fmt.Errorf("fetch proxy service %q from the Consul agent: %w", proxyID, err)
		}
		svc = s
	} else {
		cq := *q
		cq.Filter = fmt.Sprintf("ID == %q", proxyID)
		cq.MergeCentralConfig = true
		list, _, err := client.Catalog().NodeServiceList(nodeName, &cq)
		if err != nil {
			return ProxySettings{}, fmt.Errorf("fetch proxy service %q of node %q from Consul: %w", proxyID, nodeName, err)
		}
		if list == nil || len(list.Services) == 0 {
			return ProxySettings{}, fmt.Errorf("proxy service with ID %q not found on node %q", proxyID, nodeName)
		}
		if len(list.Services) > 1 {
			return ProxySettings{}, fmt.Errorf("expected one proxy service with ID %q on node %q, found %d", proxyID, nodeName, len(list.Services))
		}
		svc = list.Services[0]
	}
	if svc == nil || svc.Proxy == nil {
		return ProxySettings{}, fmt.Errorf("service %q is not a proxy service", proxyID)
	}

	src := func(what string) string { return fmt.Sprintf("proxy %q %s", proxyID, what) }
	var ps ProxySettings

	bindPort, err := weakInt(svc.Proxy.Config["bind_port"])
	if err != nil {
		return ProxySettings{}, fmt.Errorf("proxy %q: Proxy.Config bind_port: %w", proxyID, err)
	}
	if bindPort != 0 {
		ps.InboundPort = Item{Value: strconv.Itoa(bindPort), Source: src("Proxy.Config bind_port")}
	} else {
		ps.InboundPort = Item{Value: strconv.Itoa(svc.Port), Source: src("service port")}
	}

	ps.OutboundPort = Item{Value: strconv.Itoa(DefaultOutboundPort), Source: src("default outbound port")}
	if tp := svc.Proxy.TransparentProxy; tp != nil && tp.OutboundListenerPort != 0 {
		ps.OutboundPort = Item{Value: strconv.Itoa(tp.OutboundListenerPort), Source: src("TransparentProxy.OutboundListenerPort")}
	}

	for _, key := range []string{"envoy_prometheus_bind_addr", "envoy_stats_bind_addr"} {
		addr, err := weakString(svc.Proxy.Config[key])
		if err != nil {
			return ProxySettings{}, fmt.Errorf("proxy %q: Proxy.Config %s: %w", proxyID, key, err)
		}
		if addr == "" {
			continue
		}
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return ProxySettings{}, fmt.Errorf("proxy %q: Proxy.Config %s %q: %w", proxyID, key, addr, err)
		}
		ps.ExcludeInboundPorts = append(ps.ExcludeInboundPorts, Item{Value: port, Source: src("Proxy.Config " + key)})
	}

	for _, p := range svc.Proxy.Expose.Paths {
		if p.ListenerPort != 0 {
			ps.ExcludeInboundPorts = append(ps.ExcludeInboundPorts,
				Item{Value: strconv.Itoa(p.ListenerPort), Source: src("Expose.Paths ListenerPort")})
		}
	}

	if svc.Proxy.Expose.Checks && nodeName == "" {
		checks, err := client.Agent().ChecksWithFilterOpts(
			fmt.Sprintf("ServiceName == %q", svc.Proxy.DestinationServiceName), q)
		if err != nil {
			return ProxySettings{}, fmt.Errorf("fetch checks of %q from the Consul agent: %w", svc.Proxy.DestinationServiceName, err)
		}
		ids := make([]string, 0, len(checks))
		for id := range checks {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		for _, id := range ids {
			if c := checks[id]; c != nil && c.ExposedPort != 0 {
				ps.ExcludeInboundPorts = append(ps.ExcludeInboundPorts,
					Item{Value: strconv.Itoa(c.ExposedPort), Source: src("exposed port of check " + id)})
			}
		}
	}
	return ps, nil
}

// weakInt decodes an opaque Proxy.Config value as an integer the way
// mapstructure's WeakDecode (which Consul uses) does for the common cases:
// JSON numbers, numeric strings and booleans.
func weakInt(v any) (int, error) {
	switch x := v.(type) {
	case nil:
		return 0, nil
	case float64:
		if x != math.Trunc(x) || x < math.MinInt32 || x > math.MaxInt32 {
			return 0, fmt.Errorf("%v is not an integer", x)
		}
		return int(x), nil
	case int:
		return x, nil
	case json.Number:
		n, err := x.Int64()
		if err != nil || n < math.MinInt32 || n > math.MaxInt32 {
			return 0, fmt.Errorf("%q is not an integer", x)
		}
		return int(n), nil
	case string:
		if x == "" {
			return 0, nil
		}
		n, err := strconv.Atoi(x)
		if err != nil {
			return 0, fmt.Errorf("%q is not an integer", x)
		}
		return n, nil
	case bool:
		if x {
			return 1, nil
		}
		return 0, nil
	default:
		return 0, fmt.Errorf("unexpected type %T", v)
	}
}

func weakString(v any) (string, error) {
	switch x := v.(type) {
	case nil:
		return "", nil
	case string:
		return x, nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case json.Number:
		return x.String(), nil
	case bool:
		if x {
			return "1", nil
		}
		return "0", nil
	default:
		return "", fmt.Errorf("unexpected type %T", v)
	}
}
