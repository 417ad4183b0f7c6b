package mtls

import "crypto/tls"

// Key exchange groups. BenchmarkHandshake on this 2-vCPU VM (ECDSA P-256
// leaves, TCP connect + mutual handshake + first byte, both ends in one
// process): X25519 full 545 µs / resumed 405 µs versus X25519MLKEM768
// full 821 µs / resumed 594 µs, and the hybrid adds ~2.2 KB to the
// hellos. Go's TLS 1.3 resumption still does a fresh key exchange, so the
// hybrid's cost is paid on every connection, and connection setup is
// exactly where a sidecar spends its CPU. Sidecar-to-sidecar traffic stays
// inside one cluster network, so our dialers do not ask for the hybrid:
// clients offer only X25519 (then P-256, the one group every TLS stack
// and FIPS mode has), which also matches what Envoy and Consul's built-in
// proxy offer. Servers still list the hybrid first, so a peer that wants
// post-quantum protection and offers it gets it (Go's server prefers PQ
// groups the client supports); our own clients never trigger it.
// To make ferry's clients use the hybrid, set CurvePreferences on the
// config returned by ClientConfig to serverCurves (or nil for Go's default).
var (
	clientCurves = []tls.CurveID{tls.X25519, tls.CurveP256}
	serverCurves = []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256}
)
