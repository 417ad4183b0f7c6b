// Package redirect builds and applies the pod's traffic redirection rules:
// the same nat table as Consul's sdk/iptables, applied atomically and
// idempotently. It imports nothing else of ferry.
package redirect
