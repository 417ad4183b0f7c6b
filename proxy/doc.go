// Package proxy is the sidecar itself: it accepts the connections that the
// pod's redirect rules send to the inbound and outbound listeners, decides
// where each one goes, and pumps bytes between the two ends with real
// half-close in both directions. The mesh view it routes by (catalog,
// intentions) lives in sub-packages.
//
// # Data path
//
// Outbound (127.0.0.1:15001, and [::1]:15001 where the pod has IPv6: the
// IPv6 REDIRECT target is ::1): the original destination comes from
// listener.OriginalDst. A connection that was not redirected (its original
// destination is the listener itself, or the kernel has none) is reset and
// counted as outcome "loop". Otherwise the Router decides; Passthrough dials
// the original destination as plain TCP from the proxy's UID, which the
// rules exclude, so it cannot loop.
//
// Inbound (0.0.0.0:<bind_port or proxy port>): the Acceptor turns the raw
// connection into what is pumped; by default (PlainAcceptor) the raw conn
// goes to the local app (LocalServiceAddress:LocalServicePort).
//
// Both directions end in pump.Pump (proxy/pump, where every byte is
// copied): two goroutines per connection, splice between plain TCP legs,
// pooled buffers held only while data moves for TLS and tunnel legs, real
// half-close both ways, aborts passed on as aborts (TCP reset, TLS reset
// without close_notify, a tunnel's RESET frame), and the idle timeout.
//
// Between two ferry sidecars, app connections travel as tunnels
// (proxy/tunnel): one after another over a reused mTLS session, negotiated
// by ALPN. The client's session pool is tunnel.Pool, used by MeshRouter;
// the server's session loop is inboundSession (Accepted.Next) in
// MeshAcceptor, next to the intentions it asks for every tunnel. Other
// peers get one session per connection.
//
// A dial failure resets the downstream connection: its connect already
// succeeded against the proxy, and a reset is the closest the app can get
// to "connection refused". The per-listener connection cap
// (Config.MaxConnections) resets new connections past it (see
// listener.Options.MaxConns for why reset and not backlog).
//
// # Extension points (for mTLS, intentions, routing)
//
// Outbound routing — the catalog plugs in here:
//
//	type Router interface {
//		RouteOutbound(ctx context.Context, dst netip.AddrPort) Route
//	}
//	type Route struct {
//		Action   Action   // Passthrough | Dial | Reject
//		Dial     DialFunc // Action Dial: e.g. mTLS to a healthy instance, with retries
//		Upstream string   // name for logs, metrics, registry
//		Reason   string   // logged on Reject (e.g. MeshDestinationsOnly)
//		Outcome  string   // metric outcome of a Reject (default "rejected")
//		Keys     []string // extra registry keys
//	}
//	type DialFunc func(ctx context.Context) (net.Conn, error)
//
// RouteOutbound runs once per connection and must answer from memory; its
// ctx ends after the connect timeout, which bounds a wait for a view that
// has not loaded yet. ctx passed to DialFunc carries the connect timeout. Return a *tls.Conn (after
// Handshake) or anything with CloseWrite so half-close is forwarded.
// Install with Config.Router or, once the catalog is ready, Proxy.SetRouter.
//
// Inbound handshake and authorization — mTLS and intentions plug in here:
//
//	type Acceptor interface {
//		AcceptInbound(ctx context.Context, raw *net.TCPConn) (Accepted, error)
//	}
//	type Accepted struct {
//		Conn net.Conn   // what to pump: the *tls.Conn after Handshake
//		Peer string     // client SPIFFE ID (logged, stored in ConnInfo)
//		Dial DialFunc   // nil: the local app; set for DialedDirectly multi-port
//		Keys []string   // e.g. "src:<service>" for targeted revocation
//	}
//	type Refused struct{ Outcome, Reason string; Reset bool; Err error } // error type
//
// An Acceptor enforces its own handshake timeout. Returning a *Refused
// counts the connection under Refused.Outcome ("denied",
// "plaintext_refused", ...); any other error counts as "handshake_error".
// Compose them: an intentions Acceptor can wrap the mTLS one and refuse
// after looking at Accepted.Peer. Install with Config.Acceptor or
// Proxy.SetAcceptor (swappable at runtime).
//
// Live revocation — every pumped connection is in the Registry:
//
//	func (r *Registry) CloseMatching(match func(ConnInfo) bool, cause error) int
//	func (r *Registry) CloseKey(key string, cause error) int
//	func (r *Registry) Snapshot() []ConnInfo
//	type ConnInfo struct { ID uint64; Direction Direction; Source, Destination netip.AddrPort;
//		Peer, Upstream string; Keys []string; Started time.Time }
//
// e.g. on an intentions change:
//
//	p.Registry().CloseMatching(func(ci proxy.ConnInfo) bool {
//		return ci.Direction == proxy.Inbound && !allowed(ci.Peer)
//	}, errRevoked)
//
// Closed connections are counted with outcome "closed". match runs under
// the registry lock: keep it a lookup.
//
// Readiness — Proxy.AddReadyCheck(name string, fn ReadyCheck) where
// ReadyCheck is func() error; /ready answers 503 "<name>: <err>" until fn
// returns nil (mTLS: "identity" until leaf and roots are loaded).
//
// Metrics — Proxy.Metrics().Set.Register(c Collector), Collector being
// anything with WritePrometheus(io.Writer); NewCounterVec, NewGaugeVec and
// NewDurationHistogramVec build families that satisfy it.
//
// # Lifecycle
//
// New, then Apply(Endpoints) for every registration version (rebinds only
// a listener whose address changed; established connections keep
// flowing), then Shutdown(ctx): listeners close, Ready reports
// "draining", established connections finish until ctx is done and are
// then closed. Close is Shutdown without the wait.
//
// # Imports
//
// proxy imports listener, mtls, proxy/pump, proxy/tunnel, proxy/catalog
// and proxy/intentions, and nothing that imports proxy; it never imports
// cmd/, test/ or internal/testkit (internal/archtest checks this; the map
// is docs/architecture.md).
package proxy
