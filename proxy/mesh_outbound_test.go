package proxy

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/hashicorp/go-hclog"
)

// gatedSource is a catalog.Source whose map reads answer once their gate
// is open; until then they block, like a Consul without a leader. A repeat
// read (WaitIndex > 0) blocks until ctx ends: nothing changes.
type gatedSource struct {
	recs     []catalog.ProxyRecord
	meshOnly bool

	mu    sync.Mutex
	gates map[string]chan struct{} // "services", "mesh", "service-defaults", "proxy-defaults"
}

func newGatedSource(recs ...catalog.ProxyRecord) *gatedSource {
	s := &gatedSource{recs: recs, gates: map[string]chan struct{}{}}
	for _, g := range []string{"services", "mesh", "service-defaults", "proxy-defaults"} {
		s.gates[g] = make(chan struct{})
	}
	return s
}

func (s *gatedSource) open(gate string) { close(s.gates[gate]) }

func (s *gatedSource) wait(ctx context.Context, gate string, q catalog.Query) (uint64, error) {
	if q.WaitIndex == 0 {
		select {
		case <-s.gates[gate]:
			return 1, nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	<-ctx.Done()
	return 0, ctx.Err()
}

func (s *gatedSource) LocalDatacenter(context.Context) (string, error) { return "dc1", nil }
func (s *gatedSource) ServicesIndex(ctx context.Context, q catalog.Query) (uint64, error) {
	return s.wait(ctx, "services", q)
}
func (s *gatedSource) Proxies(context.Context) ([]catalog.ProxyRecord, uint64, error) {
	return s.recs, 1, nil
}
func (s *gatedSource) DialedDirectlyDefaults(ctx context.Context, q catalog.Query) (map[string]bool, uint64, error) {
	i, err := s.wait(ctx, "service-defaults", q)
	return nil, i, err
}
func (s *gatedSource) ProxyDefaultsDialedDirectly(ctx context.Context, q catalog.Query) (bool, uint64, error) {
	i, err := s.wait(ctx, "proxy-defaults", q)
	return false, i, err
}
func (s *gatedSource) MeshDestinationsOnly(ctx context.Context, q catalog.Query) (bool, uint64, error) {
	i, err := s.wait(ctx, "mesh", q)
	return s.meshOnly, i, err
}
func (s *gatedSource) Connect(ctx context.Context, _ string, _ catalog.Query) ([]catalog.Instance, uint64, error) {
	<-ctx.Done()
	return nil, 0, ctx.Err()
}

func startRouter(t *testing.T, src catalog.Source) (*MeshRouter, *catalog.View) {
	t.Helper()
	v := catalog.Start(context.Background(), src, catalog.Options{})
	t.Cleanup(func() { v.Close() })
	r := NewMeshRouter(v, mtls.NewIdentity(), nil)
	t.Cleanup(r.Close)
	return r, v
}

func routeWithin(r *MeshRouter, dst string, d time.Duration) Route {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return r.RouteOutbound(ctx, netip.MustParseAddrPort(dst))
}

// Audit F1 at the routing decision: an address another service also
// claims is refused, never routed to the later claimant.
func TestRouteOutboundRefusesAmbiguousAddress(t *testing.T) {
	src := newGatedSource(
		catalog.ProxyRecord{Service: catalog.Service{Name: "backend"}, Addr: netip.MustParseAddr("10.0.0.5"),
			Virtual: netip.MustParseAddr("10.96.0.50"), ModifyIndex: 10},
		catalog.ProxyRecord{Service: catalog.Service{Name: "evil"}, Addr: netip.MustParseAddr("10.0.0.6"),
			Virtual: netip.MustParseAddr("10.96.0.50"), ModifyIndex: 20},
		catalog.ProxyRecord{Service: catalog.Service{Name: "other"}, Addr: netip.MustParseAddr("10.0.0.7"),
			Virtual: netip.MustParseAddr("10.96.0.51")},
	)
	for g := range src.gates {
		src.open(g)
	}
	r, v := startRouter(t, src)
	<-v.Ready()
	rt := routeWithin(r, "10.96.0.50:80", time.Second)
	if rt.Action != Reject || rt.Outcome != "ambiguous" || rt.Upstream != "" {
		t.Fatalf("route to the contested address = %+v; want Reject, outcome ambiguous", rt)
	}
	if rt := routeWithin(r, "10.96.0.51:80", time.Second); rt.Action != Dial || rt.Upstream != "other" {
		t.Fatalf("route to an uncontested address = %+v; want Dial other", rt)
	}
}

// Audit F2: until the view (mesh entry included) has loaded, a mesh VIP
// and an external destination are both refused after the wait, not passed
// through in plaintext; once loaded, MeshDestinationsOnly holds from the
// first connection.
func TestRouteOutboundFailsClosedUntilLoaded(t *testing.T) {
	src := newGatedSource(catalog.ProxyRecord{Service: catalog.Service{Name: "backend"},
		Addr: netip.MustParseAddr("10.0.0.5"), Virtual: netip.MustParseAddr("10.96.0.50")})
	src.meshOnly = true
	// Everything but the mesh entry loads: an outage of that watch alone.
	src.open("services")
	src.open("service-defaults")
	src.open("proxy-defaults")
	r, v := startRouter(t, src)

	const wait = 100 * time.Millisecond
	for _, dst := range []string{"10.96.0.50:80", "203.0.113.9:443"} {
		start := time.Now()
		rt := routeWithin(r, dst, wait)
		if rt.Action != Reject || rt.Outcome != "not_ready" {
			t.Errorf("before the view loaded: %s -> %+v; want Reject, outcome not_ready", dst, rt)
		}
		if el := time.Since(start); el < wait {
			t.Errorf("%s refused after %v; want a wait of the connect timeout (%v)", dst, el, wait)
		}
	}

	// A connection waiting when the view loads is routed, not refused.
	done := make(chan Route, 1)
	go func() { done <- routeWithin(r, "10.96.0.50:80", 5*time.Second) }()
	src.open("mesh")
	<-v.Ready()
	if rt := <-done; rt.Action != Dial || rt.Upstream != "backend" {
		t.Fatalf("waiting connection after load: %+v; want Dial backend", rt)
	}
	if rt := routeWithin(r, "203.0.113.9:443", wait); rt.Action != Reject || rt.Outcome != "" {
		t.Fatalf("external after load with MeshDestinationsOnly: %+v; want Reject (mesh only)", rt)
	}
}

// Without MeshDestinationsOnly an external destination passes through once
// the view is ready, and not before.
func TestRouteOutboundPassthroughOnceLoaded(t *testing.T) {
	src := newGatedSource()
	r, v := startRouter(t, src)
	if rt := routeWithin(r, "203.0.113.9:443", 50*time.Millisecond); rt.Action != Reject || rt.Outcome != "not_ready" {
		t.Fatalf("before load: %+v; want not_ready", rt)
	}
	for g := range src.gates {
		src.open(g)
	}
	<-v.Ready()
	if rt := routeWithin(r, "203.0.113.9:443", 50*time.Millisecond); rt.Action != Passthrough {
		t.Fatalf("after load: %+v; want Passthrough", rt)
	}
}

// A Consul virtual IP the view does not hold (its service deregistered, or
// an agent restart that has not seen it registered again) is refused at
// once, never passed through: the plaintext dial could only hang, and its
// unanswered SYN left an un-NATed conntrack entry that made the app's later
// connections to the VIP from that source port skip the redirect and time
// out (the churn scenario's failures after an agent restart).
func TestRouteOutboundRefusesUnknownConsulVirtualIP(t *testing.T) {
	src := newGatedSource(catalog.ProxyRecord{Service: catalog.Service{Name: "backend"},
		Addr: netip.MustParseAddr("10.0.0.5"), ConsulVirtual: netip.MustParseAddr("240.0.0.1")})
	for g := range src.gates {
		src.open(g)
	}
	r, v := startRouter(t, src)
	<-v.Ready()
	if rt := routeWithin(r, "240.0.0.1:80", time.Second); rt.Action != Dial || rt.Upstream != "backend" {
		t.Fatalf("route to a known VIP = %+v; want Dial backend", rt)
	}
	for _, dst := range []string{"240.0.0.2:80", "255.255.255.254:443", "[::ffff:240.0.0.9]:80"} {
		if rt := routeWithin(r, dst, time.Second); rt.Action != Reject || rt.Outcome != "unknown_virtual_ip" {
			t.Errorf("route to unknown VIP %s = %+v; want Reject, outcome unknown_virtual_ip", dst, rt)
		}
	}
	for _, dst := range []string{"239.255.255.255:80", "203.0.113.9:443", "[2001:db8::1]:443"} {
		if rt := routeWithin(r, dst, time.Second); rt.Action != Passthrough {
			t.Errorf("route to %s outside the VIP range = %+v; want Passthrough", dst, rt)
		}
	}
}

// The proxy bounds RouteOutbound by the connect timeout (a router may wait
// there for its view), counts a Reject under its Route.Outcome, and logs a
// burst of rejections of one destination once.
func TestOutboundRouteWaitBoundedAndOutcomeCounted(t *testing.T) {
	testkit.CheckLeaks(t)
	router := RouterFunc(func(ctx context.Context, dst netip.AddrPort) Route {
		<-ctx.Done() // a view that never loads
		return Route{Action: Reject, Outcome: "not_ready", Reason: "catalog view not loaded yet"}
	})
	var logs testkit.LogBuffer
	p, dial := setupOutbound(t, Config{Router: router, ConnectTimeout: 100 * time.Millisecond,
		Logger: hclog.New(&hclog.LoggerOptions{Output: &logs})})
	const n = 3
	for range n {
		if _, err := dialExchange(t, dial, "198.18.251.1:7000", "x"); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("connection while not ready: %v; want reset", err)
		}
	}
	testkit.Eventually(t, "not_ready counted", func() bool { return counter(p, "outbound", "not_ready") == n })
	if got := strings.Count(logs.String(), "outbound connection rejected"); got != 1 {
		t.Fatalf("%d rejections, %d log lines; want 1:\n%s", n, got, logs.String())
	}
}
