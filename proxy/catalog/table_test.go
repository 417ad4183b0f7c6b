package catalog

import (
	"net/netip"
	"testing"
)

// Who may claim an address (audit F1): a registration's `virtual` tag and
// address are free text from whoever registers it, so a second service
// claiming an address must make it ambiguous, never take it over.
func TestBuildTableClaims(t *testing.T) {
	svcRange := []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
	backend := Service{Name: "backend", Datacenter: "dc1"}
	evil := Service{Name: "evil", Datacenter: "dc1"}
	amb := Match{Ambiguous: true}
	type want struct {
		ip string
		m  Match
		ok bool
	}
	tests := []struct {
		name      string
		recs      []ProxyRecord
		dd        map[string]bool
		cidrs     []netip.Prefix
		want      []want
		conflicts int
		ignored   int
	}{
		{
			name: "audit scenario: a later registration claims backend's ClusterIP and an external IP",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, ID: "backend-1", Addr: ip("10.0.0.5"), ConsulVirtual: ip("240.0.0.1"), Virtual: ip("10.96.0.50"), ModifyIndex: 10},
				{Service: Service{Name: "evil"}, ID: "evil-1", Addr: ip("10.0.0.6"), ConsulVirtual: ip("240.0.0.2"), ModifyIndex: 11},
				{Service: Service{Name: "evil"}, ID: "evil-2", Addr: ip("10.0.0.6"), Virtual: ip("10.96.0.50"), ModifyIndex: 20},
				{Service: Service{Name: "evil"}, ID: "evil-3", Addr: ip("10.0.0.6"), Virtual: ip("8.8.8.8"), ModifyIndex: 21},
			},
			want: []want{
				{"10.96.0.50", amb, true},
				{"240.0.0.1", Match{Service: backend}, true},
				// Without -virtual-cidr an unclaimed-by-others IP is still
				// honoured, as before; the range flag is what stops it.
				{"8.8.8.8", Match{Service: evil}, true},
			},
			conflicts: 1,
		},
		{
			name: "audit scenario with -virtual-cidr",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, Addr: ip("10.0.0.5"), Virtual: ip("10.96.0.50"), ModifyIndex: 10},
				{Service: Service{Name: "evil"}, Addr: ip("10.0.0.6"), Virtual: ip("10.96.0.50"), ModifyIndex: 20},
				{Service: Service{Name: "evil"}, Addr: ip("10.0.0.6"), Virtual: ip("8.8.8.8"), ModifyIndex: 21},
			},
			cidrs:     svcRange,
			want:      []want{{"10.96.0.50", amb, true}, {"8.8.8.8", Match{}, false}},
			conflicts: 1,
			ignored:   1,
		},
		{
			name: "registration order does not matter",
			recs: []ProxyRecord{
				{Service: Service{Name: "evil"}, Virtual: ip("10.96.0.50"), ModifyIndex: 1},
				{Service: Service{Name: "backend"}, Virtual: ip("10.96.0.50"), ModifyIndex: 99},
			},
			want:      []want{{"10.96.0.50", amb, true}},
			conflicts: 1,
		},
		{
			name: "instances of one service agree",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, ID: "b1", Virtual: ip("10.96.0.50"), ConsulVirtual: ip("240.0.0.1")},
				{Service: Service{Name: "Backend"}, ID: "b2", Virtual: ip("10.96.0.50"), ConsulVirtual: ip("240.0.0.1")},
			},
			cidrs: svcRange,
			want:  []want{{"10.96.0.50", Match{Service: backend}, true}, {"240.0.0.1", Match{Service: backend}, true}},
		},
		{
			name: "same name in another namespace is another service",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, Virtual: ip("10.96.0.50")},
				{Service: Service{Name: "backend", Namespace: "other"}, Virtual: ip("10.96.0.50")},
			},
			want:      []want{{"10.96.0.50", amb, true}},
			conflicts: 1,
		},
		{
			name: "consul-virtual wins over another service's virtual claim",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, ConsulVirtual: ip("240.0.0.1")},
				{Service: Service{Name: "evil"}, Virtual: ip("240.0.0.1")},
			},
			want:    []want{{"240.0.0.1", Match{Service: backend}, true}},
			ignored: 1,
		},
		{
			name: "consul-virtual wins over another service's instance address",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, ConsulVirtual: ip("240.0.0.1")},
				{Service: Service{Name: "evil"}, Addr: ip("240.0.0.1"), DialedDirectly: true},
			},
			want:    []want{{"240.0.0.1", Match{Service: backend}, true}},
			ignored: 1,
		},
		{
			name: "two services with one consul-virtual fail closed",
			recs: []ProxyRecord{
				{Service: Service{Name: "a"}, ConsulVirtual: ip("240.0.0.1")},
				{Service: Service{Name: "b"}, ConsulVirtual: ip("240.0.0.1")},
			},
			want:      []want{{"240.0.0.1", amb, true}},
			conflicts: 1,
		},
		{
			name: "virtual outside the range is ignored, inside is kept",
			recs: []ProxyRecord{
				{Service: Service{Name: "backend"}, Virtual: ip("10.96.0.50")},
				{Service: Service{Name: "evil"}, Virtual: ip("8.8.8.8")},
			},
			cidrs:   svcRange,
			want:    []want{{"10.96.0.50", Match{Service: backend}, true}, {"8.8.8.8", Match{}, false}},
			ignored: 1,
		},
		{
			name: "DialedDirectly: two services on one instance address",
			recs: []ProxyRecord{
				{Service: Service{Name: "old"}, Addr: ip("198.18.0.9"), DialedDirectly: true, ModifyIndex: 10},
				{Service: Service{Name: "new"}, Addr: ip("198.18.0.9"), DialedDirectly: true, ModifyIndex: 20},
			},
			want:      []want{{"198.18.0.9", amb, true}},
			conflicts: 1,
		},
		{
			name: "DialedDirectly via service-defaults: a second instance of the same service agrees",
			recs: []ProxyRecord{
				{Service: Service{Name: "db"}, ID: "db-0", Addr: ip("198.18.0.9")},
				{Service: Service{Name: "db"}, ID: "db-0b", Addr: ip("198.18.0.9")},
			},
			dd:   map[string]bool{"db": true},
			want: []want{{"198.18.0.9", Match{Service: Service{Name: "db", Datacenter: "dc1"}, Direct: true}, true}},
		},
		{
			name: "virtual of one service vs instance address of another",
			recs: []ProxyRecord{
				{Service: Service{Name: "vip"}, Addr: ip("198.18.0.1"), Virtual: ip("198.18.0.8")},
				{Service: Service{Name: "direct"}, Addr: ip("198.18.0.8"), DialedDirectly: true, ModifyIndex: 99},
			},
			want:      []want{{"198.18.0.8", amb, true}},
			conflicts: 1,
		},
		{
			name: "virtual and instance address of the same service: balanced, not direct",
			recs: []ProxyRecord{
				{Service: Service{Name: "db"}, Addr: ip("198.18.0.8"), Virtual: ip("198.18.0.8"), DialedDirectly: true},
			},
			want: []want{{"198.18.0.8", Match{Service: Service{Name: "db", Datacenter: "dc1"}}, true}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := buildTable(tt.recs, tt.dd, false, "dc1", tt.cidrs)
			for _, w := range tt.want {
				got, ok := tb.byIP[ip(w.ip)]
				if ok != w.ok || got != w.m {
					t.Errorf("%s -> %+v, %v; want %+v, %v", w.ip, got, ok, w.m, w.ok)
				}
			}
			if len(tb.conflicts) != tt.conflicts || len(tb.ignored) != tt.ignored {
				t.Errorf("conflicts %v, ignored %v; want %d and %d", tb.conflicts, tb.ignored, tt.conflicts, tt.ignored)
			}
		})
	}
}

// An ambiguous `virtual` address is not handed out by VirtualIP (DNS):
// the service's consul-virtual is.
func TestBuildTableAmbiguousNotInDNS(t *testing.T) {
	tb := buildTable([]ProxyRecord{
		{Service: Service{Name: "backend"}, ConsulVirtual: ip("240.0.0.1"), Virtual: ip("10.96.0.50")},
		{Service: Service{Name: "evil"}, Virtual: ip("10.96.0.50")},
	}, nil, false, "dc1", nil)
	if a, ok := tb.virtual["backend"]; ok {
		t.Errorf("virtual[backend] = %v; want none (ambiguous)", a)
	}
	if a := tb.consul["backend"]; a != ip("240.0.0.1") {
		t.Errorf("consul[backend] = %v; want 240.0.0.1", a)
	}
}

// The conflict is resolved as soon as the catalog agrees again.
func TestViewConflictClearsOnCatalogChange(t *testing.T) {
	f := newFake()
	backend := ProxyRecord{Service: Service{Name: "backend"}, Virtual: ip("10.96.0.50")}
	f.proxies = []ProxyRecord{backend, {Service: Service{Name: "evil"}, Virtual: ip("10.96.0.50")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	if m, ok := v.Lookup(ip("10.96.0.50")); !ok || !m.Ambiguous || m.Service.Name != "" {
		t.Fatalf("Lookup = %+v, %v; want ambiguous", m, ok)
	}
	if st := v.Stats(); st.Conflicts != 1 {
		t.Errorf("Stats.Conflicts = %d; want 1", st.Conflicts)
	}
	f.setProxies(backend)
	eventually(t, "conflict cleared", func() bool {
		m, ok := v.Lookup(ip("10.96.0.50"))
		return ok && !m.Ambiguous && m.Service.Name == "backend"
	})
	if st := v.Stats(); st.Conflicts != 0 {
		t.Errorf("Stats.Conflicts = %d; want 0", st.Conflicts)
	}
}
