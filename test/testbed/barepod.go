package testbed

import (
	"os"
	"path/filepath"
	"testing"
)

// AddBarePod creates a pod whose network namespace is empty (lo down, no
// eth0): a CNI plugin chain sets it up, as a container runtime would. Its IP
// is unset until the test fills it in from the CNI result. The namespace is
// torn down with the testbed like any pod's.
func (tb *Testbed) AddBarePod(t testing.TB, name string) *Pod {
	t.Helper()
	p := &Pod{Name: name, NS: nsPrefix(tb.Name) + name}
	p.NSPath = filepath.Join("/var/run/netns", p.NS)
	if tb.Consul != nil {
		p.env = tb.Consul.Env()
	}
	if err := ip("netns", "add", p.NS); err != nil {
		t.Fatal(err)
	}
	tb.addTeardown(func() { deleteNetns(p.NS) })
	dir := filepath.Join("/etc/netns", p.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tb.mu.Lock()
	tb.pods = append(tb.pods, p)
	tb.mu.Unlock()
	return p
}

// BridgeName is the testbed bridge's interface name: a CNI bridge plugin
// can attach pods to it, on the testbed's subnet, next to the agent.
func (tb *Testbed) BridgeName() string { return bridgeName(tb.Name) }
