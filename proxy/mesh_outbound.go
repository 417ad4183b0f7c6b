package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
	"github.com/hashicorp/go-hclog"
)

// consulVirtualRange is where Consul allocates the `consul-virtual`
// service VIPs: 240.0.0.0/4, reserved (class E), where no host answers.
var consulVirtualRange = netip.MustParsePrefix("240.0.0.0/4")

// MeshRouter routes outbound connections by the catalog view: a virtual IP
// of a mesh service goes over mTLS to a healthy instance of it (balanced,
// with retries), an instance address of a DialedDirectly service goes over
// mTLS to that very address, an unknown Consul virtual IP is refused, and
// anything else passes through as plain TCP unless the mesh config says
// MeshDestinationsOnly.
type MeshRouter struct {
	view     *catalog.View
	identity *mtls.Identity
	dialer   *net.Dialer
	log      hclog.Logger
	// handshakes counts completed outbound handshakes by resumed=true|false.
	handshakes *CounterVec
	// pool holds idle tunnel sessions to ferry peers (proxy/tunnel); nil when
	// tunnels are off.
	pool *tunnel.Pool
	// tunnels counts app connections carried as tunnels, by session=new|reused.
	tunnels *CounterVec

	// alpnRefused remembers instances that refused the tunnel protocol.
	alpnRefused *tunnel.AddrSet

	mu      sync.Mutex
	configs map[catalog.Service]*tls.Config
}

// NewMeshRouter returns a router over view that presents identity.
func NewMeshRouter(view *catalog.View, identity *mtls.Identity, log hclog.Logger) *MeshRouter {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &MeshRouter{view: view, identity: identity, dialer: &net.Dialer{}, log: log,
		configs:     map[catalog.Service]*tls.Config{},
		alpnRefused: tunnel.NewAddrSet(4096, 10*time.Minute),
		handshakes: NewCounterVec("ferry_outbound_tls_handshakes_total",
			"Outbound mTLS handshakes completed, by whether they resumed a session.", "resumed"),
		pool: tunnel.NewPool(identity.Generation),
		tunnels: NewCounterVec("ferry_outbound_tunnels_total",
			"Outbound connections carried as tunnels over a ferry peer's mTLS session, by whether the session was new or reused.", "session")}
}

// DisableTunnels makes the router dial one mTLS session per connection
// even to ferry peers. Call before use.
func (r *MeshRouter) DisableTunnels() { r.pool = nil }

// Close closes the idle tunnel sessions.
func (r *MeshRouter) Close() {
	if r.pool != nil {
		r.pool.CloseAll()
	}
}

// HandshakeMetric is the router's handshake counter, for the metrics set.
func (r *MeshRouter) HandshakeMetric() *CounterVec { return r.handshakes }

// TunnelMetric is the router's tunnel counter, for the metrics set.
func (r *MeshRouter) TunnelMetric() *CounterVec { return r.tunnels }

// RouteOutbound implements Router. It answers from memory once the view
// has loaded. Before that it fails closed (audit F2): an empty view would
// pass mesh virtual IPs through in plaintext and ignore
// MeshDestinationsOnly, so it waits for the first full load (the mesh
// entry included) until ctx ends, which the proxy bounds by the connect
// timeout, and then refuses. A later Consul outage keeps the last view.
func (r *MeshRouter) RouteOutbound(ctx context.Context, dst netip.AddrPort) Route {
	select {
	case <-r.view.Ready():
	default:
		select {
		case <-r.view.Ready():
		case <-ctx.Done():
			return Route{Action: Reject, Outcome: "not_ready", Reason: "catalog view not loaded yet"}
		}
	}
	m, ok := r.view.Lookup(dst.Addr().Unmap())
	if !ok {
		if consulVirtualRange.Contains(dst.Addr().Unmap()) {
			// Passed through, the dial could only hang until the connect
			// timeout, and its unanswered SYN would leave an un-NATed
			// conntrack entry in SYN_SENT: when the app later reuses that
			// source port for the same VIP (after it is registered
			// again), its SYN matches the entry, skips the redirect and
			// times out too. Seen after an agent restart, while the
			// services were not yet registered again.
			return Route{Action: Reject, Outcome: "unknown_virtual_ip",
				Reason: "a Consul virtual IP that no mesh service holds (deregistered, or not yet registered again after an agent restart)"}
		}
		if r.view.MeshDestinationsOnly() {
			return Route{Action: Reject, Reason: "not a mesh destination and the mesh config sets MeshDestinationsOnly"}
		}
		return Route{Action: Passthrough}
	}
	if m.Ambiguous {
		// Never resolved by ordering: that would let any registration take
		// the address over (audit F1). The view logs the claimants.
		return Route{Action: Reject, Outcome: "ambiguous", Reason: "address claimed by more than one mesh service"}
	}
	return r.Upstream(m.Service, m.Direct, dst)
}

// Upstream is the route to svc: through its instances, or (direct) to dst
// itself. Explicit upstream listeners use it too.
func (r *MeshRouter) Upstream(svc catalog.Service, direct bool, dst netip.AddrPort) Route {
	cfg := r.clientConfig(svc)
	keys := []string{"upstream:" + svc.Name}
	if direct {
		addr := dst.String()
		return Route{Action: Dial, Upstream: svc.Name, Keys: keys, Dial: func(ctx context.Context) (net.Conn, error) {
			return r.dialTLS(ctx, addr, cfg)
		}}
	}
	return Route{Action: Dial, Upstream: svc.Name, Keys: keys, Dial: func(ctx context.Context) (net.Conn, error) {
		c, _, err := r.view.Dial(ctx, svc, func(ctx context.Context, in catalog.Instance) (net.Conn, error) {
			return r.dialTLS(ctx, in.Addr.String(), cfg)
		})
		return c, err
	}}
}

// dialTLS connects and completes the handshake within ctx, so a dead or
// impostor instance fails here, where the catalog can still try another.
//
// To a ferry peer the connection is a tunnel (proxy/tunnel): over an idle
// session from the pool when there is one, else over the new session.
// Pooled sessions are filed by address and the identity they were
// verified as (cfg.ServerName names it), so a session verified as one
// service never carries another's connection, whatever the catalog says
// of the address.
func (r *MeshRouter) dialTLS(ctx context.Context, addr string, cfg *tls.Config) (net.Conn, error) {
	pool := r.pool
	key := addr + "|" + cfg.ServerName
	if pool != nil {
		for {
			tc, created, gen := pool.Get(key)
			if tc == nil {
				break
			}
			if t, err := r.openTunnel(tc, key, created, gen); err == nil {
				r.tunnels.With("reused").Inc()
				return t, nil
			}
		}
	}
	gen := r.identity.Generation()
	icfg := mtls.InstanceConfig(cfg, addr)
	alpn := len(icfg.NextProtos) > 0 && !r.alpnRefused.Has(addr)
	if !alpn {
		icfg = tunnel.WithoutALPN(icfg)
	}
	tc, err := r.handshake(ctx, addr, icfg)
	if err != nil && alpn && tunnel.IsNoALPN(err) {
		// A peer that serves other protocols by ALPN (a connect-native Go
		// service with h2) refuses ours: once more without, and remember
		// the instance for a while.
		r.alpnRefused.Add(addr)
		tc, err = r.handshake(ctx, addr, tunnel.WithoutALPN(icfg))
	}
	if err != nil {
		return nil, err
	}
	cs := tc.ConnectionState()
	r.handshakes.With(strconv.FormatBool(cs.DidResume)).Inc()
	if pool != nil && cs.NegotiatedProtocol == tunnel.ALPN {
		t, err := r.openTunnel(tc, key, time.Now(), gen)
		if err != nil {
			return nil, fmt.Errorf("tunnel to %s: %w", addr, err)
		}
		r.tunnels.With("new").Inc()
		return t, nil
	}
	return tc, nil
}

func (r *MeshRouter) handshake(ctx context.Context, addr string, cfg *tls.Config) (*tls.Conn, error) {
	raw, err := r.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(pump.NewBatchConn(raw), cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	return tc, nil
}

// openTunnel starts a tunnel on session tc; when the tunnel ends cleanly
// the session goes back to the pool under key.
func (r *MeshRouter) openTunnel(tc *tls.Conn, key string, created time.Time, gen uint64) (net.Conn, error) {
	pool := r.pool
	t := tunnel.NewConn(tc, func(clean bool) {
		if clean {
			pool.Put(key, tc, created, gen)
		} else {
			tc.Close()
		}
	})
	if err := tunnel.WriteOpen(t); err != nil {
		tc.Close()
		return nil, err
	}
	return t, nil
}

// clientConfig returns the upstream's TLS config, one per upstream so that
// its session cache lets repeat connections resume. The expected identity
// is the service's SPIFFE ID in the upstream's datacenter; the trust domain
// is the current one, read when the config is first made.
func (r *MeshRouter) clientConfig(svc catalog.Service) *tls.Config {
	r.mu.Lock()
	defer r.mu.Unlock()
	td := r.identity.TrustDomain()
	dc := svc.Datacenter
	if dc == "" {
		dc = r.view.Datacenter()
	}
	key := svc
	key.Datacenter = dc
	if c, ok := r.configs[key]; ok && c.ServerName == mtls.ServiceID(td, dc, svc.Name).SNI() {
		return c
	}
	c := r.identity.ClientConfig(mtls.ServiceID(td, dc, svc.Name))
	if r.pool != nil {
		c.NextProtos = []string{tunnel.ALPN}
	}
	r.configs[key] = c
	return c
}
