package catalog

import (
	"net/netip"
	"slices"
	"strings"
)

// table is one immutable snapshot of the IP map, rebuilt from the inputs on
// every change.
type table struct {
	byIP    map[netip.Addr]Match
	virtual map[string]netip.Addr // lower-cased service name -> `virtual` tagged address
	consul  map[string]netip.Addr // lower-cased service name -> `consul-virtual`
	direct  int
	records int
	// conflicts are the addresses claimed by more than one service, with
	// the claimants ("a, b", sorted). byIP maps them to an Ambiguous Match.
	conflicts map[netip.Addr]string
	// ignored are the claims dropped by the rules below, keyed for logging
	// each once.
	ignored map[string]ignoredClaim
}

type ignoredClaim struct {
	Addr    netip.Addr
	Service string
	Reason  string
}

// Reasons a claim is ignored.
const (
	reasonOutsideRange = "virtual address outside -virtual-cidr"
	reasonOtherVIP     = "address is another service's consul-virtual"
)

// addrClaims collects who claims one address, per kind of claim.
type addrClaims struct {
	consul, virtual, direct []Service
}

func (c *addrClaims) services() []Service {
	var out []Service
	for _, l := range [][]Service{c.consul, c.virtual, c.direct} {
		for _, s := range l {
			out = addService(out, s)
		}
	}
	return out
}

// buildTable maps destination addresses to services. Who may claim an
// address, since any workload that can register a catalog entry controls
// its `virtual` tag and its address (audit F1):
//
//   - `consul-virtual` is assigned by the servers and wins: a `virtual` or
//     DialedDirectly claim of another service on it is ignored.
//   - `virtual` is honoured only inside cidrs when any are given.
//   - Otherwise an address claimed by two different services, whatever
//     mix of `virtual` and instance addresses, is ambiguous: it is never
//     resolved by ordering, and the router refuses it until the catalog
//     no longer says two things.
//   - Claims of one service agree: a `virtual` address wins over the same
//     service's instance address (balanced, not dialed directly).
func buildTable(recs []ProxyRecord, dd map[string]bool, ddGlobal bool, dc string, cidrs []netip.Prefix) *table {
	t := &table{byIP: make(map[netip.Addr]Match, len(recs)), virtual: make(map[string]netip.Addr),
		consul: make(map[string]netip.Addr), records: len(recs),
		conflicts: make(map[netip.Addr]string), ignored: make(map[string]ignoredClaim)}
	claims := make(map[netip.Addr]*addrClaims)
	at := func(a netip.Addr) *addrClaims {
		c, ok := claims[a]
		if !ok {
			c = &addrClaims{}
			claims[a] = c
		}
		return c
	}
	svcOf := func(r ProxyRecord) Service {
		s := r.Service
		s.Datacenter = dc
		return s
	}
	ignore := func(a netip.Addr, s Service, reason string) {
		ic := ignoredClaim{Addr: a, Service: label(s), Reason: reason}
		t.ignored[a.String()+"\x00"+svcKey(s)+"\x00"+reason] = ic
	}
	for _, r := range recs {
		if r.ConsulVirtual.IsValid() {
			c := at(r.ConsulVirtual)
			c.consul = addService(c.consul, svcOf(r))
		}
	}
	// otherVIP reports whether a is a consul-virtual of a service other
	// than s.
	otherVIP := func(a netip.Addr, s Service) bool {
		c, ok := claims[a]
		if !ok {
			return false
		}
		for _, o := range c.consul {
			if svcKey(o) != svcKey(s) {
				return true
			}
		}
		return false
	}
	for _, r := range recs {
		svc := svcOf(r)
		if r.Virtual.IsValid() {
			switch {
			case len(cidrs) > 0 && !inPrefixes(r.Virtual, cidrs):
				ignore(r.Virtual, svc, reasonOutsideRange)
			case otherVIP(r.Virtual, svc):
				ignore(r.Virtual, svc, reasonOtherVIP)
			default:
				c := at(r.Virtual)
				c.virtual = addService(c.virtual, svc)
			}
		}
		if r.Addr.IsValid() && (r.DialedDirectly || ddGlobal || dd[r.Service.Name]) {
			if otherVIP(r.Addr, svc) {
				ignore(r.Addr, svc, reasonOtherVIP)
			} else {
				c := at(r.Addr)
				c.direct = addService(c.direct, svc)
			}
		}
	}
	for a, c := range claims {
		svcs := c.services()
		if len(svcs) > 1 {
			names := make([]string, len(svcs))
			for i, s := range svcs {
				names[i] = label(s)
			}
			slices.Sort(names)
			t.conflicts[a] = strings.Join(names, ", ")
			t.byIP[a] = Match{Ambiguous: true}
			continue
		}
		m := Match{Service: svcs[0], Direct: len(c.consul) == 0 && len(c.virtual) == 0}
		t.byIP[a] = m
		if m.Direct {
			t.direct++
			continue
		}
		if !isDefaultTenancy(m.Service) {
			continue
		}
		name := strings.ToLower(m.Service.Name)
		if len(c.consul) > 0 {
			t.consul[name] = a
		}
		if len(c.virtual) > 0 {
			t.virtual[name] = a
		}
	}
	return t
}

// svcKey identifies a service for collisions: names match
// case-insensitively, as in Consul's catalog, and "" is "default".
func svcKey(s Service) string {
	ns, ap := s.Namespace, s.Partition
	if ns == "" {
		ns = "default"
	}
	if ap == "" {
		ap = "default"
	}
	return ap + "/" + ns + "/" + strings.ToLower(s.Name)
}

// label names a service in logs: its name, qualified when not in the
// default namespace and partition.
func label(s Service) string {
	if isDefaultTenancy(s) {
		return s.Name
	}
	return svcKey(s)
}

func addService(l []Service, s Service) []Service {
	for _, o := range l {
		if svcKey(o) == svcKey(s) {
			return l
		}
	}
	return append(l, s)
}

func inPrefixes(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func isDefaultTenancy(s Service) bool {
	return (s.Namespace == "" || s.Namespace == "default") && (s.Partition == "" || s.Partition == "default")
}
