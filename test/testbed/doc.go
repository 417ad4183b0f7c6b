// Package testbed builds the real environment that ferry's end-to-end tests,
// the demo and the bench harness run in: a Consul v1.14.11 agent in dev mode
// and "pods" — network namespaces on a private bridge in 198.18.0.0/15, each
// with its own iptables rules, processes and resolv.conf.
//
// Nothing here is mocked: the agent is the real binary built from the tools
// module in test/tools, and pods are real kernel namespaces. Every resource is
// named with a random suffix and released through t.Cleanup, on interrupt, and
// (for resources left by a killed test process) by a sweep at the next New.
//
// NewCluster adds what the agentless tests need: three Consul servers, each
// in its own namespace on the bridge, with bootstrap_expect=3, ACLs (default
// deny), TLS from `consul tls ca/cert create` and HTTPS only, as consul-k8s
// runs them; servers can be stopped, killed and restarted (Server, Leader).
// Pods are registered as consul-k8s's endpoints controller does
// (RegisterK8s) and log in through a jwt auth method (CreateAuthMethod).
//
// The testbed needs root. RequireRoot skips a test with a clear message when
// it is not, so unprivileged `go test ./...` still passes the unit tests.
package testbed
