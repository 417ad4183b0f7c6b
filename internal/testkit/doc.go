// Package testkit holds the helpers every package's tests share: loopback
// TCP pairs and echo servers, polling for asynchronous state, goroutine
// and fd leak checks, goroutine-safe log sinks, deterministic byte
// patterns, and self-signed TLS configs.
//
// It is for tests only: no production package may import it (the import
// rules in internal/archtest enforce that), and it imports nothing of
// ferry's, so any package's in-package tests can use it without a cycle.
// Mesh identities (a Consul-like CA, SPIFFE leaves) are mtls/mtlstest's.
package testkit
