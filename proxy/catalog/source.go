package catalog

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/hashicorp/consul/api"
)

// Query carries blocking-query parameters to a Source.
type Query struct {
	WaitIndex  uint64
	WaitTime   time.Duration
	Datacenter string // "" = the agent's datacenter
}

// Source is the small slice of the Consul HTTP API the view needs. Every
// method that takes a Query is a blocking query and returns the new index.
type Source interface {
	// LocalDatacenter names the agent's datacenter.
	LocalDatacenter(ctx context.Context) (string, error)
	// ServicesIndex blocks on /v1/catalog/services and returns only its index:
	// it moves when any service registration changes.
	ServicesIndex(ctx context.Context, q Query) (uint64, error)
	// Proxies lists every connect-capable instance in the local datacenter
	// (not blocking).
	Proxies(ctx context.Context) ([]ProxyRecord, uint64, error)
	// DialedDirectlyDefaults returns the names of services whose
	// service-defaults set TransparentProxy.DialedDirectly.
	DialedDirectlyDefaults(ctx context.Context, q Query) (map[string]bool, uint64, error)
	// ProxyDefaultsDialedDirectly reports proxy-defaults "global"
	// TransparentProxy.DialedDirectly.
	ProxyDefaultsDialedDirectly(ctx context.Context, q Query) (bool, uint64, error)
	// MeshDestinationsOnly reports the mesh config entry's
	// TransparentProxy.MeshDestinationsOnly (false when there is no entry).
	MeshDestinationsOnly(ctx context.Context, q Query) (bool, uint64, error)
	// Connect lists the passing connect instances of svc.
	Connect(ctx context.Context, svc string, q Query) ([]Instance, uint64, error)
}

// ConsulSource implements Source with a consul/api client.
type ConsulSource struct {
	Client *api.Client
	// Datacenter, when set, names the local datacenter instead of the
	// agent's /v1/agent/self (agentless: servers answer that only with
	// agent:read, which a service identity lacks).
	Datacenter func(ctx context.Context) (string, error)
}

var _ Source = ConsulSource{}

// opts are the query options of a server read: stale, so that any server
// answers rather than the leader alone (the leader would otherwise serve
// every sidecar's node dumps and watches), as Envoy's proxycfg does.
func (s ConsulSource) opts(ctx context.Context, q Query) *api.QueryOptions {
	o := &api.QueryOptions{WaitIndex: q.WaitIndex, WaitTime: q.WaitTime, Datacenter: q.Datacenter, AllowStale: true}
	return o.WithContext(ctx)
}

func (s ConsulSource) LocalDatacenter(ctx context.Context) (string, error) {
	if s.Datacenter != nil {
		return s.Datacenter(ctx)
	}
	var self struct {
		Config struct{ Datacenter string }
	}
	// Agent().Self() has no context; the raw query does.
	// Agent-local: no consistency mode applies.
	if _, err := s.Client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return "", fmt.Errorf("agent self: %w", err)
	}
	if self.Config.Datacenter == "" {
		return "", fmt.Errorf("agent self: no datacenter in response")
	}
	return self.Config.Datacenter, nil
}

func (s ConsulSource) ServicesIndex(ctx context.Context, q Query) (uint64, error) {
	// Decode into an empty struct-free sink: only the index matters, and the
	// name->tags map would be thrown away.
	var sink map[string]jsonSkip
	meta, err := s.Client.Raw().Query("/v1/catalog/services", &sink, s.opts(ctx, q))
	if err != nil {
		return 0, fmt.Errorf("catalog services: %w", err)
	}
	return meta.LastIndex, nil
}

// jsonSkip decodes any JSON value and keeps nothing.
type jsonSkip struct{}

func (*jsonSkip) UnmarshalJSON([]byte) error { return nil }

// The node dump is the only non-per-service HTTP read that carries tagged
// addresses and proxy config for every instance; decode just what we use.
type dumpNode struct {
	Node     string
	Address  string
	Services []dumpService
}

type dumpService struct {
	Kind            string
	ID              string
	Service         string
	Address         string
	TaggedAddresses map[string]struct{ Address string }
	Proxy           *struct {
		DestinationServiceName string
		TransparentProxy       *struct{ DialedDirectly bool }
	}
	Connect     *struct{ Native bool }
	Namespace   string
	Partition   string
	PeerName    string
	ModifyIndex uint64
}

func (s ConsulSource) Proxies(ctx context.Context) ([]ProxyRecord, uint64, error) {
	var dump []dumpNode
	meta, err := s.Client.Raw().Query("/v1/internal/ui/nodes", &dump, s.opts(ctx, Query{}))
	if err != nil {
		return nil, 0, fmt.Errorf("node dump: %w", err)
	}
	return proxiesFromDump(dump), meta.LastIndex, nil
}

func proxiesFromDump(dump []dumpNode) []ProxyRecord {
	var out []ProxyRecord
	for _, n := range dump {
		for _, sv := range n.Services {
			if sv.PeerName != "" {
				continue // imported from a peer: not routed by this view
			}
			var r ProxyRecord
			switch {
			case sv.Kind == "connect-proxy" && sv.Proxy != nil && sv.Proxy.DestinationServiceName != "":
				r.Service.Name = sv.Proxy.DestinationServiceName
				r.DialedDirectly = sv.Proxy.TransparentProxy != nil && sv.Proxy.TransparentProxy.DialedDirectly
			case sv.Kind == "" && sv.Connect != nil && sv.Connect.Native:
				r.Service.Name = sv.Service
			default:
				continue
			}
			r.Service.Namespace, r.Service.Partition = sv.Namespace, sv.Partition
			r.ID, r.Node, r.ModifyIndex = sv.ID, n.Node, sv.ModifyIndex
			addr := sv.Address
			if addr == "" {
				addr = n.Address
			}
			r.Addr = parseIP(addr)
			r.ConsulVirtual = parseIP(sv.TaggedAddresses["consul-virtual"].Address)
			r.Virtual = parseIP(sv.TaggedAddresses["virtual"].Address)
			out = append(out, r)
		}
	}
	return out
}

func parseIP(s string) netip.Addr {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}
	}
	return a.Unmap()
}

func (s ConsulSource) DialedDirectlyDefaults(ctx context.Context, q Query) (map[string]bool, uint64, error) {
	entries, meta, err := s.Client.ConfigEntries().List(api.ServiceDefaults, s.opts(ctx, q))
	if err != nil {
		return nil, 0, fmt.Errorf("list service-defaults: %w", err)
	}
	out := make(map[string]bool)
	for _, e := range entries {
		if sd, ok := e.(*api.ServiceConfigEntry); ok && sd.TransparentProxy != nil && sd.TransparentProxy.DialedDirectly {
			out[sd.Name] = true
		}
	}
	return out, meta.LastIndex, nil
}

func (s ConsulSource) ProxyDefaultsDialedDirectly(ctx context.Context, q Query) (bool, uint64, error) {
	// List, not Get: Get of a missing entry is a 404 and does not block.
	entries, meta, err := s.Client.ConfigEntries().List(api.ProxyDefaults, s.opts(ctx, q))
	if err != nil {
		return false, 0, fmt.Errorf("list proxy-defaults: %w", err)
	}
	for _, e := range entries {
		if pd, ok := e.(*api.ProxyConfigEntry); ok && pd.Name == api.ProxyConfigGlobal &&
			pd.TransparentProxy != nil && pd.TransparentProxy.DialedDirectly {
			return true, meta.LastIndex, nil
		}
	}
	return false, meta.LastIndex, nil
}

func (s ConsulSource) MeshDestinationsOnly(ctx context.Context, q Query) (bool, uint64, error) {
	entries, meta, err := s.Client.ConfigEntries().List(api.MeshConfig, s.opts(ctx, q))
	if err != nil {
		return false, 0, fmt.Errorf("list mesh config: %w", err)
	}
	for _, e := range entries {
		if m, ok := e.(*api.MeshConfigEntry); ok && m.TransparentProxy.MeshDestinationsOnly {
			return true, meta.LastIndex, nil
		}
	}
	return false, meta.LastIndex, nil
}

func (s ConsulSource) Connect(ctx context.Context, svc string, q Query) ([]Instance, uint64, error) {
	entries, meta, err := s.Client.Health().Connect(svc, "", true, s.opts(ctx, q))
	if err != nil {
		return nil, 0, fmt.Errorf("health connect %s: %w", svc, err)
	}
	out := make([]Instance, 0, len(entries))
	for _, e := range entries {
		if e.Service == nil || e.Node == nil {
			continue
		}
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		ip := parseIP(addr)
		if !ip.IsValid() || e.Service.Port <= 0 || e.Service.Port > 65535 {
			continue // hostnames are not dialable by IP; skip rather than guess
		}
		out = append(out, Instance{
			Addr:       netip.AddrPortFrom(ip, uint16(e.Service.Port)),
			ID:         e.Service.ID,
			Node:       e.Node.Node,
			Datacenter: e.Node.Datacenter,
			Service:    Service{Name: svc, Namespace: e.Service.Namespace, Partition: e.Service.Partition, Datacenter: q.Datacenter},
		})
	}
	return out, meta.LastIndex, nil
}
