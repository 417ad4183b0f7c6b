package proxy

import (
	"crypto/tls"
	"fmt"
	"net"
	"slices"

	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
)

// Kernel TLS between ferry sidecars (docs/ktls.md).
//
// Agreement is by ALPN, so a foreign peer (Envoy, Consul's built-in proxy,
// a connect-native app) never offers a kernel token and meets exactly the
// user-space TLS it met before. A ferry client whose kernel can do kTLS
// offers KTLSTunnelALPN before tunnel.ALPN when it tunnels (the default),
// and KTLSALPN when it does not (-tunnels=false); a ferry server whose
// kernel can selects it; both then hand the session to the kernel after
// the handshake. On a one-connection session the pump splices between the
// app's socket and the kTLS socket; on a tunnel session the tunnel's
// frames go through the kTLS socket (the kernel seals and opens them, the
// payload is copied through ferry as on a user-space tunnel). kTLS is
// wire-transparent: if one end's handoff is refused, that end goes on in
// user space and the other cannot tell. An old ferry peer knows neither
// token and gets a user-space tunnel (tunnel.ALPN) as before.

// The pump splices a kernel TLS session's socket because *ktls.Conn is a
// pump.KernelTLS leg.
var _ pump.KernelTLS = (*ktls.Conn)(nil)

// KTLSALPN marks a one-connection mTLS session that both ferry ends hand
// to the kernel. It carries the app's bytes as they are (no tunnel frames).
const KTLSALPN = "ferry/1+ktls"

// KTLSTunnelALPN marks a tunnel session (proxy/tunnel: tunnel.ALPN's
// frames, reuse, GOAWAY) that both ferry ends hand to the kernel.
const KTLSTunnelALPN = "ferry/tunnel+ktls"

// kernelALPN reports whether proto is one of the kernel TLS tokens.
func kernelALPN(proto string) bool { return proto == KTLSALPN || proto == KTLSTunnelALPN }

// tunnelALPN reports whether proto carries tunnels.
func tunnelALPN(proto string) bool { return proto == tunnel.ALPN || proto == KTLSTunnelALPN }

// KTLS is the sidecar's kernel TLS policy, decided once at start
// (ktls.Decide).
type KTLS struct {
	// Use: offer (outbound) and accept (inbound) kernel TLS sessions,
	// tunnel or one-connection, with ferry peers.
	Use bool
	// Required: refuse every mTLS session that does not end up in the
	// kernel (a foreign peer, a ferry peer without kTLS, a refused
	// handoff).
	Required bool
}

// TLS modes, the mode label of ferry_mesh_tls_sessions_total.
const (
	tlsModeKernel   = "ktls"
	tlsModeUser     = "userspace"
	tlsModeFallback = "fallback" // agreed on kTLS, this end's handoff was refused
)

// NewTLSModeMetric is the counter of mTLS sessions by direction and mode.
func NewTLSModeMetric() *CounterVec {
	return NewCounterVec("ferry_mesh_tls_sessions_total",
		"mTLS sessions established, by direction and where their records are sealed and opened: "+
			"ktls (the kernel), userspace, or fallback (kernel TLS was agreed but this end's handoff was refused: user space).",
		"direction", "mode")
}

// newKTLSHandoff prepares raw for a handshake that may end in the kernel,
// over the pump's BatchConn (reads pass through, so the cork holds), or
// returns nil when kernel TLS is off: then the handshake reads as before,
// without the cork's record-at-a-time reads.
func newKTLSHandoff(use bool, raw net.Conn) *ktls.Handoff {
	tcp, ok := raw.(*net.TCPConn)
	if !use || !ok {
		return nil
	}
	return ktls.NewHandoff(tcp, pump.NewBatchConn(tcp))
}

// handOff moves a completed session into the kernel when it negotiated
// KTLSALPN or KTLSTunnelALPN, before any application byte. It returns the session to use and
// its mode. A refused handoff (ktls.CanFallBack) keeps tc, in user space,
// with mode fallback and the reason in err; any other error means the
// connection is unusable and must be closed.
func handOff(h *ktls.Handoff, tc *tls.Conn) (net.Conn, string, error) {
	if h == nil {
		return tc, tlsModeUser, nil
	}
	if !kernelALPN(tc.ConnectionState().NegotiatedProtocol) {
		h.Abandon()
		return tc, tlsModeUser, nil
	}
	k, err := h.Enable(tc)
	switch {
	case err == nil:
		return k, tlsModeKernel, nil
	case ktls.CanFallBack(err):
		return tc, tlsModeFallback, err
	}
	return nil, "", err
}

// requireKernel is the -ktls=required check on a session's mode.
func requireKernel(k KTLS, mode string) error {
	if k.Required && mode != tlsModeKernel {
		return fmt.Errorf("-ktls=required: the session is in user space (%s)", mode)
	}
	return nil
}

// alpnServerConfig answers ALPN with the first of protos (in this order of
// preference) the client offers, and negotiates no ALPN with a client that
// offers none of them: a Go server with NextProtos would abort a handshake
// whose client offers only others (see tunnel/alpn.go).
func alpnServerConfig(base *tls.Config, protos []string) *tls.Config {
	if len(protos) == 0 {
		c := base.Clone()
		c.NextProtos = nil
		return c
	}
	cfgs := make([]*tls.Config, len(protos))
	for i, p := range protos {
		cfgs[i] = base.Clone()
		cfgs[i].NextProtos = []string{p}
	}
	cfg := base.Clone()
	cfg.NextProtos = nil
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		for i, p := range protos {
			if slices.Contains(hello.SupportedProtos, p) {
				return cfgs[i], nil
			}
		}
		return nil, nil
	}
	return cfg
}
