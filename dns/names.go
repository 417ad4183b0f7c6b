package dns

import (
	"strings"

	mdns "github.com/miekg/dns"
)

// zoneKind says which naming scheme a query name belongs to.
type zoneKind int

const (
	zoneOther   zoneKind = iota // not ours: forward to the recursors
	zoneCluster                 // under the cluster domain
	zoneConsul                  // under the Consul domain
)

// nameInfo is what the server needs to know about a query name.
type nameInfo struct {
	kind zoneKind
	zone string // the apex used in negative answers' SOA (fqdn, lower case)
	// service is the mesh service the name stands for when it has one of
	// the mesh forms; empty otherwise. The mesh view decides whether it
	// really is a mesh service.
	service string
	// virtual is set for <svc>.virtual.<consul domain>: only mesh services
	// have VIPs, so the mesh view is the whole truth for its A/AAAA.
	virtual bool
}

// classify parses a lower-case fqdn.
//
// Mesh forms:
//
//	<svc>.<ns>.svc.<cluster domain>   any Kubernetes namespace: OSS Consul has
//	                                  only the "default" namespace, and
//	                                  consul-k8s without namespaces registers
//	                                  every Kubernetes namespace's services in it
//	<svc>.virtual.<consul domain>
//	<svc>.service.<consul domain>
//	<svc>.service.<dc>.<consul domain>
//	<svc>.service.<dc>.dc.<consul domain>  (dc = the local datacenter, lower case;
//	                                  "" while unknown)
//
// Everything else under the Consul domain (tags, SRV names, node, connect,
// query, peers, other datacenters) is not a mesh form and goes to Consul.
func classify(name string, c *Config, dc string) nameInfo {
	if rest, ok := under(name, c.ClusterDomain); ok {
		ni := nameInfo{kind: zoneCluster, zone: c.ClusterDomain}
		l := labels(rest)
		if len(l) == 3 && l[2] == "svc" && l[0] != "" && l[1] != "" {
			ni.service = l[0]
		}
		return ni
	}
	if rest, ok := under(name, c.ConsulDomain); ok {
		ni := nameInfo{kind: zoneConsul, zone: c.ConsulDomain}
		l := labels(rest)
		switch {
		case len(l) == 2 && (l[1] == "virtual" || l[1] == "service"):
			ni.service = l[0]
			ni.virtual = l[1] == "virtual"
		case len(l) == 3 && l[1] == "service" && dc != "" && l[2] == dc:
			ni.service = l[0]
		case len(l) == 4 && l[1] == "service" && dc != "" && l[2] == dc && l[3] == "dc":
			ni.service = l[0]
		}
		// "_web._tcp" style SRV labels are never service names.
		if strings.HasPrefix(ni.service, "_") {
			ni.service, ni.virtual = "", false
		}
		return ni
	}
	return nameInfo{kind: zoneOther}
}

// under reports whether name is strictly below zone and returns the part
// before it (without the separating dot).
func under(name, zone string) (string, bool) {
	if len(name) <= len(zone)+1 || !strings.HasSuffix(name, zone) {
		return "", false
	}
	rest := name[:len(name)-len(zone)]
	if !mdns.IsFqdn(rest) { // the boundary must be a real dot, not "\."
		return "", false
	}
	return rest[:len(rest)-1], true
}

func labels(s string) []string {
	return mdns.SplitDomainName(s)
}
