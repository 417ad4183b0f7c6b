package redirect

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/golden")

type goldenCase struct {
	name     string
	cfg      Config
	families []Family
}

func items(source string, vs ...string) []Item {
	var out []Item
	for _, v := range vs {
		out = append(out, Item{Value: v, Source: source})
	}
	return out
}

func it(v string) Item { return Item{Value: v, Source: "test"} }

func goldenCases() []goldenCase {
	min := Config{ProxyUserID: it("5995"), ProxyInboundPort: it("20000")}
	with := func(f func(*Config)) Config { c := min; f(&c); return c }
	return []goldenCase{
		{name: "minimal", cfg: min},
		{name: "outbound-port", cfg: with(func(c *Config) { c.ProxyOutboundPort = it("15002") })},
		{name: "outbound-port-zero", cfg: with(func(c *Config) { c.ProxyOutboundPort = it("0") })},
		{name: "dns-port-default-ip", cfg: with(func(c *Config) { c.ConsulDNSPort = it("8600") })},
		{name: "dns-port-explicit-ip", cfg: with(func(c *Config) { c.ConsulDNSIP = it("198.18.0.10"); c.ConsulDNSPort = it("8600") })},
		{name: "dns-ip-only", cfg: with(func(c *Config) { c.ConsulDNSIP = it("198.18.0.53") })},
		{name: "reference-verified", cfg: referenceConfig()},
		{name: "exclusions-reversed", cfg: with(func(c *Config) {
			c.ExcludeInboundPorts = items("t", "8000:8100", "https", " 9000 ", "7:7")
			c.ExcludeOutboundPorts = items("t", "1", "2", "3")
			c.ExcludeOutboundCIDRs = items("t", "198.18.0.0/15", "198.19.1.2", "10.1.2.3/8")
			c.ExcludeUIDs = items("t", "1000-2000", "0", "42")
		})},
		{name: "dual-stack-mixed", families: []Family{IPv4, IPv6}, cfg: with(func(c *Config) {
			c.ConsulDNSPort = it("8600")
			c.ExcludeOutboundCIDRs = items("t", "198.18.0.0/15", "2001:DB8::/32", "fd00::1")
			c.ExcludeOutboundPorts = items("t", "443")
			c.ExcludeUIDs = items("t", "5996")
			c.ExcludeInboundPorts = items("t", "21000")
		})},
		{name: "dual-stack-dns6-ip-only", families: []Family{IPv4, IPv6}, cfg: with(func(c *Config) {
			c.ConsulDNSIP = it("2001:db8::53")
		})},
		// consul-k8s's dual-stack mode: DNS on ::1 (redirect.md §1.6).
		{name: "dual-stack-consul-k8s", families: []Family{IPv4, IPv6}, cfg: with(func(c *Config) {
			c.ConsulDNSIP = it("::1")
			c.ConsulDNSPort = it("8600")
			c.ProxyOutboundPort = it("15001")
			c.ExcludeUIDs = items("t", "5996")
		})},
		{name: "dual-stack-dns4-port", families: []Family{IPv4, IPv6}, cfg: with(func(c *Config) {
			c.ConsulDNSIP = it("127.0.0.1")
			c.ConsulDNSPort = it("8600")
		})},
	}
}

// referenceConfig is the configuration whose Consul result was verified on
// real iptables (shared/reference/redirect.md §1.5).
func referenceConfig() Config {
	return Config{
		ProxyUserID:          it("5995"),
		ProxyInboundPort:     it("20000"),
		ProxyOutboundPort:    it("15001"),
		ConsulDNSIP:          it("127.0.0.1"),
		ConsulDNSPort:        it("8600"),
		ExcludeInboundPorts:  items("t", "20200", "21000", "20300", "20400"),
		ExcludeOutboundPorts: items("t", "8080", "9090"),
		ExcludeOutboundCIDRs: items("t", "10.0.0.0/8", "169.254.169.254/32"),
		ExcludeUIDs:          items("t", "5996", "1234"),
	}
}

func renderGolden(plans []Plan) string {
	var b strings.Builder
	for _, p := range plans {
		b.WriteString("# " + p.Family.String() + ": sdk/iptables command order\n")
		for _, s := range p.Steps {
			b.WriteString(p.Family.Command() + " -t nat " + s.String() + "\n")
		}
		b.WriteString("# " + p.Family.String() + ": resulting state (iptables-restore)\n")
		b.WriteString(p.Restore())
	}
	return b.String()
}

func TestGoldenPlans(t *testing.T) {
	for _, c := range goldenCases() {
		t.Run(c.name, func(t *testing.T) {
			got := renderGolden(mustPlans(t, c.cfg, c.families...))
			path := filepath.Join("testdata", "golden", c.name+".golden")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if got != string(want) {
				t.Errorf("plan differs from %s\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		})
	}
}

// TestReferenceVerifiedState compares the plan with the iptables-save output
// the reference recorded from Consul's own sdk/iptables on a real kernel.
func TestReferenceVerifiedState(t *testing.T) {
	const verified = `-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT
-A OUTPUT -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j CONSUL_DNS_REDIRECT
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_DNS_REDIRECT -d 127.0.0.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:8600
-A CONSUL_DNS_REDIRECT -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.1:8600
-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 20400 -j RETURN
-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 20300 -j RETURN
-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 21000 -j RETURN
-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 20200 -j RETURN
-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 1234 -j RETURN
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 169.254.169.254/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 10.0.0.0/8 -j RETURN
-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 9090 -j RETURN
-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 8080 -j RETURN
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001`
	p := mustPlans(t, referenceConfig())[0]
	var got []string
	for _, l := range strings.Split(p.Restore(), "\n") {
		if strings.HasPrefix(l, "-A ") {
			got = append(got, l)
		}
	}
	// iptables-save prints user chains sorted by name; the order of rules
	// within a chain is what matters.
	want := strings.Split(verified, "\n")
	byChain := func(ls []string) map[string][]string {
		m := map[string][]string{}
		for _, l := range ls {
			c := strings.Fields(l)[1]
			m[c] = append(m[c], l)
		}
		return m
	}
	g, w := byChain(got), byChain(want)
	if len(got) != len(want) {
		t.Fatalf("got %d rules, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}
	for c, wl := range w {
		if !slices.Equal(g[c], wl) {
			t.Errorf("chain %s:\n got %q\nwant %q", c, g[c], wl)
		}
	}
	if !slices.Equal(p.Chains(), Chains()) {
		t.Errorf("chains %v", p.Chains())
	}
}

func TestBuildDNSFamilyMismatch(t *testing.T) {
	c := Config{ProxyUserID: it("1"), ProxyInboundPort: it("2"), ConsulDNSIP: it("2001:db8::53")}
	s, err := c.Validate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Build(s, IPv4); err == nil || !strings.Contains(err.Error(), "-ipv6") {
		t.Fatalf("want error mentioning -ipv6, got %v", err)
	}
}

func TestBuildPerFamilyExclusions(t *testing.T) {
	c := Config{ProxyUserID: it("1"), ProxyInboundPort: it("2"),
		ExcludeOutboundCIDRs: items("t", "198.18.0.0/15", "2001:db8::/32")}
	plans := mustPlans(t, c, IPv4, IPv6)
	v4, v6 := plans[0].Restore(), plans[1].Restore()
	if !strings.Contains(v4, "198.18.0.0/15") || strings.Contains(v4, "2001:db8") {
		t.Errorf("IPv4 plan:\n%s", v4)
	}
	if !strings.Contains(v6, "2001:db8::/32") || strings.Contains(v6, "198.18") || !strings.Contains(v6, "-d ::1/128 -j RETURN") {
		t.Errorf("IPv6 plan:\n%s", v6)
	}
}
