package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// DialFunc opens the upstream leg of a connection. ctx carries the connect
// timeout and is cancelled on hard shutdown. The returned conn should support
// CloseWrite (*net.TCPConn, *tls.Conn, or anything with a CloseWrite method)
// so half-close can be forwarded; a conn without it is closed whole when the
// other side finishes sending.
type DialFunc func(ctx context.Context) (net.Conn, error)

// Action is what an outbound Route asks the proxy to do.
type Action int

const (
	// Passthrough dials the original destination over plain TCP.
	Passthrough Action = iota
	// Dial uses Route.Dial (e.g. mTLS to a mesh upstream, with retries).
	Dial
	// Reject resets the downstream connection (e.g. MeshDestinationsOnly).
	Reject
)

func (a Action) String() string {
	switch a {
	case Passthrough:
		return "passthrough"
	case Dial:
		return "dial"
	case Reject:
		return "reject"
	}
	return fmt.Sprintf("action(%d)", int(a))
}

// Route is an outbound routing decision.
type Route struct {
	Action Action
	// Dial is used when Action is Dial.
	Dial DialFunc
	// Upstream names the destination for logs, metrics and the registry
	// ("" for passthrough).
	Upstream string
	// Reason is logged when Action is Reject.
	Reason string
	// Outcome labels a Reject in ferry_connections_total ("rejected" when
	// empty), e.g. "not_ready" or "ambiguous".
	Outcome string
	// Keys are extra registry keys for the connection (see Registry.CloseKey).
	Keys []string
}

// Router decides where an outbound connection goes, given its original
// destination. It is called once per connection on the hot path: it must
// answer from memory (a watched catalog view), never with a network call.
// ctx ends after the connect timeout; a router may wait on it only while
// its view has not loaded yet (to fail closed rather than open).
// Dialing, retries and instance choice belong in the returned Route.Dial.
type Router interface {
	RouteOutbound(ctx context.Context, dst netip.AddrPort) Route
}

// RouterFunc adapts a function to Router.
type RouterFunc func(ctx context.Context, dst netip.AddrPort) Route

// RouteOutbound calls f.
func (f RouterFunc) RouteOutbound(ctx context.Context, dst netip.AddrPort) Route { return f(ctx, dst) }

// PassthroughRouter sends every destination through as plain TCP: the
// behaviour before the catalog and mTLS land.
type PassthroughRouter struct{}

// RouteOutbound returns Passthrough.
func (PassthroughRouter) RouteOutbound(context.Context, netip.AddrPort) Route {
	return Route{Action: Passthrough}
}

// Accepted is what an Acceptor hands back for an accepted inbound connection.
type Accepted struct {
	// Conn is the connection to pump (the *tls.Conn after the handshake,
	// or the raw conn in plain/permissive mode). Required.
	Conn net.Conn
	// Peer is the authenticated identity (SPIFFE ID) or "" when plain.
	Peer string
	// Dial overrides the upstream leg; nil dials the local app
	// (LocalServiceAddress:LocalServicePort).
	Dial DialFunc
	// Keys are extra registry keys for the connection, e.g. the source
	// service name, so a revocation can close exactly its connections.
	Keys []string
	// Done, when set, is called once the connection has ended (however it
	// ended), e.g. to stop tracking it for intention revocation.
	Done func()
	// Revoked, when set, reports whether the acceptor withdrew the
	// connection's authorization and closed it (an intention now denies
	// its source): the connection is then counted as outcome "revoked"
	// rather than as an error.
	Revoked func() bool
	// Next, when set, waits for the next connection over the same session
	// (a tunnel, proxy/tunnel) once this one has ended and been closed, and
	// returns it; an error means the session is over (and closed). ctx is
	// cancelled when the proxy starts draining.
	Next func(ctx context.Context) (Accepted, error)
}

// Acceptor is the inbound handshake and authorization hook. It gets the raw
// accepted connection and returns what to pump. On error the proxy closes
// raw (if the error is a *Refused with Reset, with a reset) and counts the
// connection under the error's Outcome; an Acceptor must not close raw
// itself unless it also returns an error. Handshake timeouts are the
// Acceptor's job: it must not block past ctx or its own deadline.
type Acceptor interface {
	AcceptInbound(ctx context.Context, raw *net.TCPConn) (Accepted, error)
}

// AcceptorFunc adapts a function to Acceptor.
type AcceptorFunc func(ctx context.Context, raw *net.TCPConn) (Accepted, error)

// AcceptInbound calls f.
func (f AcceptorFunc) AcceptInbound(ctx context.Context, raw *net.TCPConn) (Accepted, error) {
	return f(ctx, raw)
}

// PlainAcceptor passes the raw connection through unauthenticated: the
// behaviour before mTLS lands (and the permissive-mode fallback).
type PlainAcceptor struct{}

// AcceptInbound returns raw unchanged.
func (PlainAcceptor) AcceptInbound(_ context.Context, raw *net.TCPConn) (Accepted, error) {
	return Accepted{Conn: raw}, nil
}

// Refused is an error a hook returns to refuse a connection with its own
// metrics outcome label ("denied", "handshake_error", ...).
type Refused struct {
	Outcome string
	Reason  string
	// Reset closes the downstream with RST instead of FIN.
	Reset bool
	Err   error
}

func (r *Refused) Error() string {
	if r.Err != nil {
		return fmt.Sprintf("%s: %s: %v", r.Outcome, r.Reason, r.Err)
	}
	return fmt.Sprintf("%s: %s", r.Outcome, r.Reason)
}

func (r *Refused) Unwrap() error { return r.Err }

// ReadyCheck reports why the proxy is not ready yet (nil when it is). The
// mTLS identity adds one ("identity not loaded").
type ReadyCheck func() error
