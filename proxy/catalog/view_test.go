package catalog

import (
	"context"
	"errors"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

// startView starts a view on f with fast test timings and registers cleanup
// that also checks no goroutine is left behind.
func startView(t *testing.T, f *fakeSource, o Options) *View {
	t.Helper()
	before := runtime.NumGoroutine()
	if o.RetryMin == 0 {
		o.RetryMin, o.RetryMax = 5*time.Millisecond, 20*time.Millisecond
	}
	if o.MinInterval == 0 {
		o.MinInterval = time.Millisecond
	}
	v := Start(context.Background(), f, o)
	t.Cleanup(func() {
		v.Close()
		v.Close() // idempotent
		deadline := time.Now().Add(2 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Errorf("goroutines leaked: %d before, %d after Close", before, n)
		}
	})
	return v
}

func waitReady(t *testing.T, v *View) {
	t.Helper()
	select {
	case <-v.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("view not ready after 5s")
	}
}

// eventually polls cond for up to 2s: the view applies changes
// asynchronously and has no per-change signal.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestViewMap(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{
		{Service: Service{Name: "web"}, ID: "web-1-proxy", Addr: ip("198.18.0.2"), ConsulVirtual: ip("240.0.0.1")},
		{Service: Service{Name: "web"}, ID: "web-2-proxy", Addr: ip("198.18.0.3"), ConsulVirtual: ip("240.0.0.1")},
		{Service: Service{Name: "api"}, ID: "api-1", Addr: ip("198.18.0.4"), ConsulVirtual: ip("240.0.0.2"), Virtual: ip("198.19.0.10")},
		{Service: Service{Name: "db"}, ID: "db-1", Addr: ip("198.18.0.5"), ConsulVirtual: ip("240.0.0.3"), DialedDirectly: true},
		{Service: Service{Name: "cache"}, ID: "cache-1", Addr: ip("198.18.0.6"), ConsulVirtual: ip("240.0.0.4")},
		{Service: Service{Name: "novip"}, ID: "novip-1", Addr: ip("198.18.0.7")},
	}
	f.ddDefaults = map[string]bool{"cache": true}
	v := startView(t, f, Options{})
	waitReady(t, v)

	web := Service{Name: "web", Datacenter: "dc1"}
	tests := []struct {
		ip   string
		want Match
		ok   bool
	}{
		{"240.0.0.1", Match{Service: web}, true},
		{"240.0.0.2", Match{Service: Service{Name: "api", Datacenter: "dc1"}}, true},
		{"198.19.0.10", Match{Service: Service{Name: "api", Datacenter: "dc1"}}, true},
		{"198.18.0.5", Match{Service: Service{Name: "db", Datacenter: "dc1"}, Direct: true}, true},    // registration flag
		{"198.18.0.6", Match{Service: Service{Name: "cache", Datacenter: "dc1"}, Direct: true}, true}, // service-defaults
		{"198.18.0.2", Match{}, false},                                                                // instance IPs of non-direct services are not matched
		{"198.18.0.7", Match{}, false},
		{"203.0.113.1", Match{}, false},
		{"::ffff:240.0.0.1", Match{Service: web}, true}, // v4-mapped form from an IPv6 socket
	}
	for _, tt := range tests {
		got, ok := v.Lookup(ip(tt.ip))
		if ok != tt.ok || got != tt.want {
			t.Errorf("Lookup(%s) = %+v, %v; want %+v, %v", tt.ip, got, ok, tt.want, tt.ok)
		}
	}
	if a, ok := v.VirtualIP("api"); !ok || a != ip("198.19.0.10") {
		t.Errorf("VirtualIP(api) = %v, %v; want the `virtual` tag 198.19.0.10", a, ok)
	}
	if a, ok := v.VirtualIP("web"); !ok || a != ip("240.0.0.1") {
		t.Errorf("VirtualIP(web) = %v, %v; want consul-virtual 240.0.0.1", a, ok)
	}
	if _, ok := v.VirtualIP("novip"); ok {
		t.Error("VirtualIP(novip) found; want none")
	}
	st := v.Stats()
	if st.MapWatches != 4 || st.InstanceWatches != 0 || st.DirectIPs != 2 || st.Records != 6 {
		t.Errorf("Stats = %+v", st)
	}
}

func TestViewProxyDefaultsDialedDirectly(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, Addr: ip("198.18.0.2"), ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	if _, ok := v.Lookup(ip("198.18.0.2")); ok {
		t.Fatal("instance address matched before DialedDirectly was set")
	}
	f.mutate(func() { f.ddGlobal = true }, "proxy-defaults")
	eventually(t, "proxy-defaults DialedDirectly", func() bool {
		m, ok := v.Lookup(ip("198.18.0.2"))
		return ok && m.Direct
	})
}

// Collisions between services are refused, not resolved by ordering
// (audit F1); the cases are in TestBuildTableClaims. Through the view:
func TestViewCollisions(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{
		// Same pod IP claimed by two services: ambiguous, whatever the index.
		{Service: Service{Name: "old"}, Addr: ip("198.18.0.9"), DialedDirectly: true, ModifyIndex: 10},
		{Service: Service{Name: "new"}, Addr: ip("198.18.0.9"), DialedDirectly: true, ModifyIndex: 20},
		// A virtual address of one service and an instance address of another.
		{Service: Service{Name: "vip"}, Addr: ip("198.18.0.1"), Virtual: ip("198.18.0.8")},
		{Service: Service{Name: "direct"}, Addr: ip("198.18.0.8"), DialedDirectly: true, ModifyIndex: 99},
	}
	v := startView(t, f, Options{})
	waitReady(t, v)
	for _, a := range []string{"198.18.0.9", "198.18.0.8"} {
		if m, ok := v.Lookup(ip(a)); !ok || !m.Ambiguous {
			t.Errorf("Lookup(%s) = %+v, %v; want ambiguous", a, m, ok)
		}
	}
}

func TestViewUpdatesAndMeshOnly(t *testing.T) {
	f := newFake()
	v := startView(t, f, Options{})
	waitReady(t, v)
	if v.MeshDestinationsOnly() {
		t.Fatal("MeshDestinationsOnly true with no mesh entry")
	}
	if _, ok := v.Lookup(ip("240.0.0.1")); ok {
		t.Fatal("empty catalog matched")
	}

	start := time.Now()
	f.setProxies(ProxyRecord{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")})
	eventually(t, "new VIP", func() bool { _, ok := v.Lookup(ip("240.0.0.1")); return ok })
	t.Logf("add applied in %v", time.Since(start))

	f.setProxies()
	eventually(t, "removed VIP", func() bool { _, ok := v.Lookup(ip("240.0.0.1")); return !ok })

	f.mutate(func() { f.meshOnly = true }, "mesh")
	eventually(t, "mesh-only on", v.MeshDestinationsOnly)
	f.mutate(func() { f.meshOnly = false }, "mesh")
	eventually(t, "mesh-only off", func() bool { return !v.MeshDestinationsOnly() })
}

func TestViewHealthChangesDoNotReread(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	base := f.proxiesCalls.Load()
	for range 20 {
		f.setInstances("web", inst("a", "198.18.0.2:20000"))
	}
	f.setProxies(f.proxies...)
	eventually(t, "re-read after a services change", func() bool { return f.proxiesCalls.Load() > base })
	if got := f.proxiesCalls.Load() - base; got > 2 {
		t.Errorf("bulk reads after 20 health changes and 1 service change = %d; want 1 (at most 2)", got)
	}
}

func TestViewRecoversFromErrors(t *testing.T) {
	f := newFake()
	f.fail["proxies"] = errors.New("boom")
	f.fail["mesh"] = errors.New("boom")
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	select {
	case <-v.Ready():
		t.Fatal("ready while watches fail")
	case <-time.After(50 * time.Millisecond):
	}
	f.setFail("proxies", nil)
	f.setFail("mesh", nil)
	waitReady(t, v)
	if _, ok := v.Lookup(ip("240.0.0.1")); !ok {
		t.Fatal("VIP missing after recovery")
	}
}

func TestProxiesFromDump(t *testing.T) {
	dump := []dumpNode{{Node: "n1", Address: "198.18.5.1", Services: []dumpService{
		{Kind: "", ID: "consul", Service: "consul"},
		{Kind: "connect-proxy", ID: "web-1-sidecar", Service: "web-sidecar-proxy", Address: "198.18.5.2",
			TaggedAddresses: map[string]struct{ Address string }{"consul-virtual": {"240.0.0.1"}, "virtual": {"198.19.0.10"}},
			Proxy: &struct {
				DestinationServiceName string
				TransparentProxy       *struct{ DialedDirectly bool }
			}{"web", &struct{ DialedDirectly bool }{true}}, ModifyIndex: 18},
		{Kind: "", ID: "native-1", Service: "native", Connect: &struct{ Native bool }{true}},
		{Kind: "connect-proxy", ID: "peer-1", Service: "x-sidecar-proxy", PeerName: "other"},
		{Kind: "mesh-gateway", ID: "gw", Service: "gw"},
	}}}
	got := proxiesFromDump(dump)
	if len(got) != 2 {
		t.Fatalf("got %d records, want 2: %+v", len(got), got)
	}
	w := got[0]
	if w.Service.Name != "web" || w.Addr != ip("198.18.5.2") || w.ConsulVirtual != ip("240.0.0.1") ||
		w.Virtual != ip("198.19.0.10") || !w.DialedDirectly || w.Node != "n1" || w.ModifyIndex != 18 {
		t.Errorf("web record = %+v", w)
	}
	if n := got[1]; n.Service.Name != "native" || n.Addr != ip("198.18.5.1") {
		t.Errorf("native record = %+v (want node address fallback)", n)
	}
}

func TestVirtualIPCaseInsensitive(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "Web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	for _, n := range []string{"web", "WEB", "Web"} {
		if a, ok := v.VirtualIP(n); !ok || a != ip("240.0.0.1") {
			t.Errorf("VirtualIP(%q) = %v, %v", n, a, ok)
		}
	}
	if m, _ := v.Lookup(ip("240.0.0.1")); m.Service.Name != "Web" {
		t.Errorf("Lookup keeps the registered spelling; got %q", m.Service.Name)
	}
}

// An agent restart (dev agent) moves indexes backwards; Consul then blocks a
// query at the old index for its whole wait, so the view must start over
// after the errors of the outage and re-read.
func TestViewIndexGoesBackwards(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	for range 5 {
		f.setProxies(f.proxies...) // push the services index up
	}
	eventually(t, "reads caught up", func() bool { return f.proxiesCalls.Load() >= 2 })
	// The restart: in-flight queries fail, then the new agent has low indexes.
	f.setFail("services", errors.New("connection refused"))
	eventually(t, "view saw the outage", func() bool { return f.errors.Load() > 0 })
	f.mutate(func() {
		delete(f.fail, "services")
		f.index = map[string]uint64{"services": 2}
		f.proxies = []ProxyRecord{{Service: Service{Name: "api"}, ConsulVirtual: ip("240.0.0.1")}}
	})
	eventually(t, "re-read after reset", func() bool {
		m, _ := v.Lookup(ip("240.0.0.1"))
		return m.Service.Name == "api"
	})
}

func BenchmarkLookup(b *testing.B) {
	recs := make([]ProxyRecord, 5000)
	for i := range recs {
		recs[i] = ProxyRecord{Service: Service{Name: "svc"}, ConsulVirtual: netip.AddrFrom4([4]byte{240, 0, byte(i >> 8), byte(i)})}
	}
	v := &View{}
	v.table.Store(buildTable(recs, nil, false, "dc1", nil))
	hit, miss := ip("240.0.10.10"), ip("203.0.113.9")
	b.ReportAllocs()
	for b.Loop() {
		v.Lookup(hit)
		v.Lookup(miss)
	}
}
