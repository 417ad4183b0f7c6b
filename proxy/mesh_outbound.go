package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/ktls"
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
	// redialTimeout bounds a replay's dial (tunnel.NewClientConn).
	redialTimeout time.Duration
	// ktls is the kernel TLS policy (ktls.go); tlsModes counts new
	// sessions by direction="outbound" and mode.
	ktls     KTLS
	tlsModes *CounterVec

	mu      sync.Mutex
	configs map[catalog.Service]*tls.Config
}

// NewMeshRouter returns a router over view that presents identity.
func NewMeshRouter(view *catalog.View, identity *mtls.Identity, log hclog.Logger) *MeshRouter {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &MeshRouter{view: view, identity: identity, dialer: &net.Dialer{}, log: log,
		redialTimeout: DefaultConnectTimeout,
		configs:       map[catalog.Service]*tls.Config{},
		alpnRefused:   tunnel.NewAddrSet(4096, 10*time.Minute),
		handshakes: NewCounterVec("ferry_outbound_tls_handshakes_total",
			"Outbound mTLS handshakes completed, by whether they resumed a session.", "resumed"),
		tlsModes: NewTLSModeMetric(),
		pool:     tunnel.NewPool(identity.Generation),
		tunnels: NewCounterVec("ferry_outbound_tunnels_total",
			"Outbound connections carried as tunnels over a ferry peer's mTLS session, by whether the session was new or reused, or the connection replayed on a new session after the server ended a reused one (GOAWAY).", "session")}
}

// DisableTunnels makes the router dial one mTLS session per connection
// even to ferry peers. Call before use.
func (r *MeshRouter) DisableTunnels() { r.pool = nil }

// SetKTLS sets the kernel TLS policy. Call before use. The router offers
// kernel TLS tunnel sessions (KTLSTunnelALPN) with tunnels, one-connection
// kernel sessions (KTLSALPN) without (see ktls.go).
func (r *MeshRouter) SetKTLS(k KTLS) { r.ktls = k }

// TLSModeMetric counts mTLS sessions by direction and mode; the inbound
// side (MeshAcceptor.TLSModes) shares it.
func (r *MeshRouter) TLSModeMetric() *CounterVec { return r.tlsModes }

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
	// fresh dials a new session, never a pooled one: the replay of a
	// connection that a pooled session's server turned away (GOAWAY).
	var dial func(ctx context.Context, fresh bool) (net.Conn, error)
	if direct {
		addr := dst.String()
		dial = func(ctx context.Context, fresh bool) (net.Conn, error) {
			return r.dialTLS(ctx, addr, cfg, fresh, r.redial(dial, fresh))
		}
	} else {
		dial = func(ctx context.Context, fresh bool) (net.Conn, error) {
			c, _, err := r.view.Dial(ctx, svc, func(ctx context.Context, in catalog.Instance) (net.Conn, error) {
				return r.dialTLS(ctx, in.Addr.String(), cfg, fresh, r.redial(dial, fresh))
			})
			return c, err
		}
	}
	return Route{Action: Dial, Upstream: svc.Name, Keys: keys, Dial: func(ctx context.Context) (net.Conn, error) {
		return dial(ctx, false)
	}}
}

// redial is a tunnel's way to start its connection again on a new session
// (tunnel.NewClientConn) through the route's dial: through the catalog,
// another instance if this one is draining. nil for a replay itself: a
// second GOAWAY ends the connection.
func (r *MeshRouter) redial(dial func(context.Context, bool) (net.Conn, error), fresh bool) func() (net.Conn, error) {
	if fresh {
		return nil
	}
	return func() (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), r.redialTimeout)
		defer cancel()
		c, err := dial(ctx, true)
		if err == nil {
			r.tunnels.With("replayed").Inc()
		}
		return c, err
	}
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
//
// fresh skips the pool (a replay). redial, when not nil, lets the tunnel
// start again on a new session if the server turns it away (tunnel.GoAway).
func (r *MeshRouter) dialTLS(ctx context.Context, addr string, cfg *tls.Config, fresh bool, redial func() (net.Conn, error)) (net.Conn, error) {
	pool := r.pool
	key := addr + "|" + cfg.ServerName
	if pool != nil && !fresh {
		for {
			tc, created, gen := pool.Get(key)
			if tc == nil {
				break
			}
			if t, err := r.openTunnel(tc, key, created, gen, redial); err == nil {
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
	tc, h, err := r.handshake(ctx, addr, icfg)
	if err != nil && alpn && tunnel.IsNoALPN(err) {
		// A peer that serves other protocols by ALPN (a connect-native Go
		// service with h2) refuses ours: once more without, and remember
		// the instance for a while.
		r.alpnRefused.Add(addr)
		tc, h, err = r.handshake(ctx, addr, tunnel.WithoutALPN(icfg))
	}
	if err != nil {
		return nil, err
	}
	cs := tc.ConnectionState()
	r.handshakes.With(strconv.FormatBool(cs.DidResume)).Inc()
	conn, mode, err := handOff(h, tc)
	if conn == nil {
		// Half in the kernel: no TLS layer can close it cleanly. Reset.
		if raw := pump.TCPOf(tc); raw != nil {
			_ = raw.SetLinger(0)
			raw.Close()
		}
		return nil, fmt.Errorf("kernel TLS handoff with %s: %w", addr, err)
	}
	if err != nil {
		r.log.Debug("kernel TLS handoff refused: user-space TLS", "addr", addr, "error", err)
	}
	r.tlsModes.With("outbound", mode).Inc()
	if err := requireKernel(r.ktls, mode); err != nil {
		conn.Close()
		return nil, fmt.Errorf("session with %s: %w", addr, err)
	}
	// conn is the kernel session, or tc after a refused handoff: a tunnel
	// runs the same over either.
	if sess, ok := conn.(tunnel.Session); ok && pool != nil && tunnelALPN(cs.NegotiatedProtocol) {
		t, err := r.openTunnel(sess, key, time.Now(), gen, redial)
		if err != nil {
			return nil, fmt.Errorf("tunnel to %s: %w", addr, err)
		}
		r.tunnels.With("new").Inc()
		return t, nil
	}
	return conn, nil
}

// handshake dials addr and completes the handshake. When cfg offers kernel
// TLS the handshake runs on a ktls.Handoff (returned) so that dialTLS can
// move the session into the kernel.
func (r *MeshRouter) handshake(ctx context.Context, addr string, cfg *tls.Config) (*tls.Conn, *ktls.Handoff, error) {
	raw, err := r.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	var tc *tls.Conn
	h := newKTLSHandoff(r.ktls.Use && slices.ContainsFunc(cfg.NextProtos, kernelALPN), raw)
	if h != nil {
		tc = h.Client(cfg)
	} else {
		tc = tls.Client(pump.NewBatchConn(raw), cfg)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	return tc, h, nil
}

// openTunnel starts a tunnel on session tc; when the tunnel ends cleanly
// the session goes back to the pool under key.
func (r *MeshRouter) openTunnel(tc tunnel.Session, key string, created time.Time, gen uint64, redial func() (net.Conn, error)) (net.Conn, error) {
	pool := r.pool
	t := tunnel.NewClientConn(tc, func(clean bool) {
		if clean {
			pool.Put(key, tc, created, gen)
		} else {
			tc.Close()
		}
	}, redial)
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
	switch {
	case r.pool != nil && r.ktls.Use:
		// An old ferry server selects tunnel.ALPN, a foreign one nothing.
		c.NextProtos = []string{KTLSTunnelALPN, tunnel.ALPN}
	case r.pool != nil:
		c.NextProtos = []string{tunnel.ALPN}
	case r.ktls.Use:
		c.NextProtos = []string{KTLSALPN}
	}
	r.configs[key] = c
	return c
}
