package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

// Testbed is one isolated mesh: a bridge, a Consul agent reachable from the
// pods on the bridge's address, and the pods attached to it.
type Testbed struct {
	// Name is the random id that every resource of this testbed carries.
	Name string
	// Subnet is the /24 inside 198.18.0.0/15 that the bridge and pods use.
	Subnet netip.Prefix
	// Gateway is the bridge's address; the agent listens on it.
	Gateway netip.Addr
	// Subnet6 is the /64 inside the documentation prefix 2001:db8::/32
	// that dual-stack pods (Pod.AddIPv6) use, derived from Subnet. Only
	// the pods carry it: the bridge, hence the host, has no IPv6 address.
	Subnet6 netip.Prefix
	Consul  *Agent

	mu       sync.Mutex
	nextHost int
	pods     []*Pod
	teardown []func()
	unhook   func()
}

// New builds a testbed and registers its teardown with t.Cleanup.
func New(t testing.TB) *Testbed {
	t.Helper()
	RequireRoot(t)
	tb, err := Open(ConsulBinary(t), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("consul agent log (tail):\n%s", tail(tb.Consul.Log(), 60))
		}
		tb.Close()
	})
	return tb
}

// Open builds a testbed for callers without a testing.TB (demo, bench); they
// must call Close. logf receives progress lines; nil discards them.
func Open(consulPath string, logf func(string, ...any)) (*Testbed, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	sweepStale()
	tb := &Testbed{Name: randomID(), nextHost: 2}
	if err := writeMarker(tb.Name); err != nil {
		return nil, fmt.Errorf("testbed: marker: %w", err)
	}
	tb.unhook = interrupts.add(tb.Close)
	if err := tb.makeBridge(); err != nil {
		tb.Close()
		return nil, err
	}
	agent, err := startAgent(consulPath, tb.Name, tb.Gateway, logf)
	if err != nil {
		tb.Close()
		return nil, err
	}
	tb.Consul = agent
	tb.addTeardown(agent.Stop)
	logf("testbed %s: bridge %s %s, consul http://%s", tb.Name, bridgeName(tb.Name), tb.Subnet, agent.HTTPAddr)
	return tb, nil
}

// Close tears everything down in reverse order. It is idempotent.
func (tb *Testbed) Close() {
	tb.mu.Lock()
	fs := tb.teardown
	tb.teardown = nil
	unhook := tb.unhook
	tb.unhook = nil
	tb.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
	if unhook != nil {
		unhook()
		removeMarker(tb.Name)
	}
}

func (tb *Testbed) addTeardown(f func()) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.teardown = append(tb.teardown, f)
}

// makeBridge picks a /24 in 198.18.0.0/15 that no local interface uses and
// puts the bridge on its .1.
func (tb *Testbed) makeBridge() error {
	used := usedPrefixes()
	for range 64 {
		n, _ := rand.Int(rand.Reader, big.NewInt(512))
		third := byte(n.Int64() % 256)
		second := byte(18 + n.Int64()/256)
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, second, third, 0}), 24)
		if used[p] {
			continue
		}
		tb.Subnet = p
		tb.Gateway = p.Addr().Next()
		tb.Subnet6 = netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 198, second, third}), 64)
		break
	}
	if !tb.Subnet.IsValid() {
		return fmt.Errorf("testbed: no free /24 in 198.18.0.0/15")
	}
	br := bridgeName(tb.Name)
	if err := ip("link", "add", br, "type", "bridge"); err != nil {
		return err
	}
	tb.addTeardown(func() { run("ip", "link", "del", br) })
	if err := ip("addr", "add", netip.PrefixFrom(tb.Gateway, 24).String(), "dev", br); err != nil {
		return err
	}
	return ip("link", "set", br, "up")
}

func usedPrefixes() map[netip.Prefix]bool {
	used := map[netip.Prefix]bool{}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() {
			used[netip.PrefixFrom(p.Addr(), 24).Masked()] = true
		}
	}
	return used
}

func randomID() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// ip runs an iproute2 command and returns its output in the error.
func ip(args ...string) error {
	out, err := run("ip", args...)
	if err != nil {
		return fmt.Errorf("testbed: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}
