package catalog

import (
	"fmt"
	"net/netip"
)

// Service names a mesh service. Empty Namespace/Partition mean "default";
// empty Datacenter means the local datacenter.
type Service struct {
	Name       string
	Namespace  string
	Partition  string
	Datacenter string
}

func (s Service) String() string {
	ns, ap := s.Namespace, s.Partition
	if ns == "" {
		ns = "default"
	}
	if ap == "" {
		ap = "default"
	}
	return fmt.Sprintf("%s/%s/%s/%s", ap, ns, s.Name, s.Datacenter)
}

// Match is the result of Lookup: the mesh service a destination IP belongs
// to. Direct is true when the IP is an instance address of a DialedDirectly
// service: the proxy must then dial the original destination IP:port (with
// mTLS) instead of load balancing over the service's instances.
//
// Ambiguous is true when more than one service claims the IP (see
// buildTable): Service is then empty and the connection must be refused.
type Match struct {
	Service   Service
	Direct    bool
	Ambiguous bool
}

// Instance is one passing connect-capable instance (sidecar proxy or
// connect-native service) of a destination service.
type Instance struct {
	// Addr is the proxy's Service.Address (else Node.Address) and port.
	Addr       netip.AddrPort
	ID         string // service instance ID, e.g. "web-1-sidecar-proxy"
	Node       string
	Datacenter string
	Service    Service // the destination service
}

func (in Instance) key() string { return in.Node + "\x00" + in.ID + "\x00" + in.Addr.String() }

// ProxyRecord is one connect-capable instance as read from the bulk catalog
// listing; it feeds the IP map.
type ProxyRecord struct {
	Service Service // destination service (Datacenter left empty: local)
	ID      string
	Node    string
	// Addr is the best address (Service.Address, else Node.Address); invalid
	// when that is not an IP literal.
	Addr           netip.Addr
	ConsulVirtual  netip.Addr // TaggedAddresses["consul-virtual"], 240.0.0.0/4
	Virtual        netip.Addr // TaggedAddresses["virtual"], e.g. a k8s ClusterIP
	DialedDirectly bool       // Proxy.TransparentProxy.DialedDirectly on the registration
	ModifyIndex    uint64
}
