package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/hashicorp/go-hclog"
)

// MeshRouter routes outbound connections by the catalog view: a virtual IP
// of a mesh service goes over mTLS to a healthy instance of it (balanced,
// with retries), an instance address of a DialedDirectly service goes over
// mTLS to that very address, and anything else passes through as plain TCP
// unless the mesh config says MeshDestinationsOnly.
type MeshRouter struct {
	view     *catalog.View
	identity *mtls.Identity
	dialer   *net.Dialer
	log      hclog.Logger
	// handshakes counts completed outbound handshakes by resumed=true|false.
	handshakes *CounterVec

	mu      sync.Mutex
	configs map[catalog.Service]*tls.Config
}

// NewMeshRouter returns a router over view that presents identity.
func NewMeshRouter(view *catalog.View, identity *mtls.Identity, log hclog.Logger) *MeshRouter {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &MeshRouter{view: view, identity: identity, dialer: &net.Dialer{}, log: log,
		configs: map[catalog.Service]*tls.Config{},
		handshakes: NewCounterVec("ferry_outbound_tls_handshakes_total",
			"Outbound mTLS handshakes completed, by whether they resumed a session.", "resumed")}
}

// HandshakeMetric is the router's handshake counter, for the metrics set.
func (r *MeshRouter) HandshakeMetric() *CounterVec { return r.handshakes }

// RouteOutbound implements Router. It answers from memory.
func (r *MeshRouter) RouteOutbound(_ context.Context, dst netip.AddrPort) Route {
	m, ok := r.view.Lookup(dst.Addr().Unmap())
	if !ok {
		if r.view.MeshDestinationsOnly() {
			return Route{Action: Reject, Reason: "not a mesh destination and the mesh config sets MeshDestinationsOnly"}
		}
		return Route{Action: Passthrough}
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
func (r *MeshRouter) dialTLS(ctx context.Context, addr string, cfg *tls.Config) (net.Conn, error) {
	raw, err := r.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(newBatchConn(raw), mtls.InstanceConfig(cfg, addr))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	r.handshakes.With(strconv.FormatBool(tc.ConnectionState().DidResume)).Inc()
	return tc, nil
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
	r.configs[key] = c
	return c
}
