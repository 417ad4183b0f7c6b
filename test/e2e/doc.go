// Package e2e holds ferry's end-to-end tests: real Consul agent, real
// network namespaces, real iptables, the real ferry binary. They need root and
// skip with a message otherwise. One file per feature.
package e2e
