package mtls

import "crypto/tls"

// Key exchange groups. BenchmarkHandshake on this 2-vCPU VM (ECDSA P-256
// leaves, TCP connect + mutual handshake + first byte, both ends in one
// process), resumed handshakes, median of 8: P-256 287 µs, X25519 329 µs,
// X25519MLKEM768 505 µs (full: 489 / 486 / 669 µs; the hybrid also adds
// ~2.2 KB to the hellos). Go's TLS 1.3 resumption still does a fresh key
// exchange, so the group's cost is paid on every connection, and
// connection setup is exactly where a sidecar spends its CPU: in the
// bench's new-connection scenario X25519's field arithmetic was ~19 % of
// ferry's CPU. Go's P-256 generates keys from precomputed base-point
// tables, which makes a whole exchange ~40 µs cheaper per side than
// X25519 (crypto/ecdh: 43 µs vs 65-97 µs for generate + ECDH).
//
// So our dialers offer only P-256: RFC 8446 §9.1 makes it mandatory for
// every TLS 1.3 implementation, it is the FIPS group and the curve of
// Consul's own CA keys. (Go fixes the order of the groups a client offers
// and always sends its key share for X25519 when X25519 is enabled, so
// listing P-256 first would not be enough.) Servers still list the hybrid
// first and accept X25519, so a peer that wants post-quantum protection
// and offers it gets it (Go's server prefers PQ groups the client
// supports), and Consul's built-in proxy or Envoy get what they offer.
// Sidecar-to-sidecar traffic stays inside one cluster network; to make
// ferry's clients use the hybrid, set CurvePreferences on the config
// returned by ClientConfig to serverCurves (or nil for Go's default).
var (
	clientCurves = []tls.CurveID{tls.CurveP256}
	serverCurves = []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256}
)
