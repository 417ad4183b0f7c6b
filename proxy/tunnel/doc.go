// Package tunnel carries app connections between two ferry sidecars one
// after another over a reused mTLS session, instead of one handshake per
// connection: the frame protocol (tunnel.go), the client's pool of idle
// sessions (pool.go), the ALPN negotiation that offers it only to
// peers that speak it (alpn.go), and, over a kernel TLS session, the
// frame-aware splice of DATA payloads (splice.go).
//
// Surface: ALPN; Session (a *tls.Conn or a *ktls.Conn); Conn (one app
// connection over a session: a net.Conn with CloseWrite that the pump sees
// as a pump.Framed source, a pump.Aborter leg and, over a kernel session,
// a pump.FrameSplicer), NewConn, NewClientConn (replays its connection on a new session
// when the server answers with GOAWAY), WriteOpen and ReadOpen; GoAway for
// the server ending a session between tunnels; Pool with Get, Put and CloseAll;
// ServerConfig, WithoutALPN, IsNoALPN and AddrSet for the negotiation;
// ServerIdle and ServerMaxAge for the server's session loop. Verifying the
// peer is mtls's job and deciding on each tunnel the intentions', both
// called by proxy.MeshAcceptor, whose session loop (inboundSession) stays
// in proxy next to them.
//
// Rules: tunnel imports proxy/pump (BatchConn, ReadWaiter, TCPOf, the
// buffer pool, the chunk splice) and nothing else of ferry's, never proxy; it keeps no
// metrics (proxy.MeshRouter counts tunnels). Checked by internal/archtest.
package tunnel
