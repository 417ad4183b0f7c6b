package testbed

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Pod is a network namespace attached to the testbed bridge: lo up, eth0 with
// an address in the testbed's /24, and a default route into an ifb sink, so
// the only addresses it can reach are the bridge's. Its resolv.conf names
// 127.0.0.1, as in a consul-k8s pod with DNS redirection.
type Pod struct {
	Name string
	// NS is the netns name (for `ip netns exec`); NSPath its file.
	NS, NSPath string
	IP         netip.Addr
	// IP6 is the pod's global IPv6 address once AddIPv6 gave it one.
	IP6  netip.Addr
	host int // the pod's number in the testbed (last byte of IP)
	sub6 netip.Prefix
	env  []string
}

// AddPod creates a pod; it is torn down with the testbed.
func (tb *Testbed) AddPod(t testing.TB, name string) *Pod {
	t.Helper()
	p, err := tb.NewPod(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// NewPod is AddPod for callers without a testing.TB.
func (tb *Testbed) NewPod(name string) (*Pod, error) {
	tb.mu.Lock()
	host := tb.nextHost
	tb.nextHost++
	tb.mu.Unlock()
	if host > 254 {
		return nil, fmt.Errorf("testbed: out of pod addresses")
	}
	a := tb.Subnet.Addr().As4()
	a[3] = byte(host)
	p := &Pod{
		Name: name,
		NS:   nsPrefix(tb.Name) + name,
		IP:   netip.AddrFrom4(a),
		host: host,
		sub6: tb.Subnet6,
	}
	p.NSPath = filepath.Join("/var/run/netns", p.NS)
	if tb.Consul != nil {
		p.env = tb.Consul.Env()
	}
	if err := ip("netns", "add", p.NS); err != nil {
		return nil, err
	}
	tb.addTeardown(func() { deleteNetns(p.NS) })
	veth := "fv" + tb.Name + strconv.Itoa(host)
	steps := [][]string{
		{"-n", p.NS, "link", "set", "lo", "up"},
		{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", p.NS},
		{"-n", p.NS, "addr", "add", netip.PrefixFrom(p.IP, 24).String(), "dev", "eth0"},
		{"-n", p.NS, "link", "set", "eth0", "up"},
		// The sink gives every other destination a route (so connect to a
		// virtual IP reaches the nat OUTPUT hook instead of failing with
		// ENETUNREACH) while guaranteeing nothing leaves the test network.
		{"-n", p.NS, "link", "add", "sink0", "type", "ifb"},
		{"-n", p.NS, "link", "set", "sink0", "up"},
		{"-n", p.NS, "route", "add", "default", "dev", "sink0"},
	}
	for i, s := range steps {
		if err := ip(s...); err != nil {
			return nil, err
		}
		if i == 1 {
			// Deleting the namespace destroys the pair too, but only once
			// the kernel has released the namespace; delete it explicitly
			// so nothing is visible after teardown.
			tb.addTeardown(func() { run("ip", "link", "del", veth) })
			if err := ip("link", "set", veth, "master", bridgeName(tb.Name), "up"); err != nil {
				return nil, err
			}
		}
	}
	dir := filepath.Join("/etc/netns", p.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		return nil, err
	}
	tb.mu.Lock()
	tb.pods = append(tb.pods, p)
	tb.mu.Unlock()
	return p, nil
}

// DisableIPv6 turns IPv6 off in the pod (an IPv4-only pod, as some CNIs
// make them; by default a pod's interfaces get link-local IPv6 addresses).
func (p *Pod) DisableIPv6(t testing.TB) {
	t.Helper()
	p.ExecOK(t, Proc{}, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	if out := p.ExecOK(t, Proc{}, "ip", "-6", "-o", "addr", "show", "scope", "link"); strings.TrimSpace(out) != "" {
		t.Fatalf("pod %s still has link-local IPv6 addresses:\n%s", p.Name, out)
	}
}

// LinkLocalIPv6 waits until the pod's eth0 has a usable (not tentative)
// link-local IPv6 address and returns it.
func (p *Pod) LinkLocalIPv6(t testing.TB) netip.Addr {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := p.ExecOK(t, Proc{}, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
		for _, f := range strings.Fields(out) {
			if pf, err := netip.ParsePrefix(f); err == nil && pf.Addr().IsLinkLocalUnicast() && !strings.Contains(out, "tentative") {
				return pf.Addr()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s: no usable link-local IPv6 address on eth0:\n%s", p.Name, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// AddIPv6 makes the pod dual-stack: eth0 gets the global address of the
// pod's number in the testbed's Subnet6 (the documentation prefix), and
// IPv6's default route goes into the sink, like IPv4's, so nothing but the
// bridge's pods is reachable. It returns (and sets) p.IP6.
func (p *Pod) AddIPv6(t testing.TB) netip.Addr {
	t.Helper()
	a := p.sub6.Addr().As16()
	a[15] = byte(p.host)
	ip6 := netip.AddrFrom16(a)
	for _, s := range [][]string{
		// nodad: usable at once; the testbed hands out each address once.
		{"-n", p.NS, "-6", "addr", "add", netip.PrefixFrom(ip6, 64).String(), "dev", "eth0", "nodad"},
		{"-n", p.NS, "-6", "route", "add", "default", "dev", "sink0"},
	} {
		if err := ip(s...); err != nil {
			t.Fatal(err)
		}
	}
	p.IP6 = ip6
	return ip6
}
