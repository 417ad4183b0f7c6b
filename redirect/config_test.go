package redirect

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateCanonical(t *testing.T) {
	c := Config{
		ProxyUserID:          it(" 5995 "),
		ProxyInboundPort:     it("20000"),
		ExcludeInboundPorts:  items("t", "80", " 443", "8000:8100", "90:90", "ssh"),
		ExcludeOutboundCIDRs: items("t", "198.18.1.2/15", "198.18.0.1", "2001:DB8::1/32", "::1"),
		ExcludeUIDs:          items("t", "0", "4294967294", "7-7", "10-20"),
	}
	s, err := c.Validate()
	if err != nil {
		t.Fatal(err)
	}
	if s.ProxyUID != "5995" || s.OutboundPort != DefaultOutboundPort {
		t.Errorf("spec %+v", s)
	}
	if got := strings.Join(s.ExcludeInboundPorts, ","); got != "80,443,8000:8100,90,22" {
		t.Errorf("ports %s", got)
	}
	var cidrs []string
	for _, p := range s.ExcludeOutboundCIDRs {
		cidrs = append(cidrs, p.String())
	}
	if got := strings.Join(cidrs, ","); got != "198.18.0.0/15,198.18.0.1/32,2001:db8::/32,::1/128" {
		t.Errorf("cidrs %s", got)
	}
	if got := strings.Join(s.ExcludeUIDs, ","); got != "0,4294967294,7,10-20" {
		t.Errorf("uids %s", got)
	}
}

func TestValidateErrorsNameSourceAndValue(t *testing.T) {
	ok := Config{ProxyUserID: it("5995"), ProxyInboundPort: it("20000")}
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"missing uid", func(c *Config) { c.ProxyUserID = Item{Source: "-proxy-uid"} }, `-proxy-uid ""`},
		{"uid name", func(c *Config) { c.ProxyUserID = Item{Value: "envoy", Source: "-proxy-uid"} }, `-proxy-uid "envoy"`},
		{"uid -1", func(c *Config) { c.ExcludeUIDs = items("-exclude-uid", "4294967295") }, `-exclude-uid "4294967295"`},
		{"uid range reversed", func(c *Config) { c.ExcludeUIDs = items("-exclude-uid", "9-3") }, "reversed"},
		{"inbound missing", func(c *Config) { c.ProxyInboundPort = Item{Source: "-proxy-inbound-port"} }, "-proxy-inbound-port"},
		{"inbound negative", func(c *Config) { c.ProxyInboundPort = Item{Value: "-1", Source: "-proxy-inbound-port"} }, `-proxy-inbound-port "-1"`},
		{"outbound too big", func(c *Config) { c.ProxyOutboundPort = Item{Value: "65536", Source: "-proxy-outbound-port"} }, `"65536"`},
		{"dns port", func(c *Config) { c.ConsulDNSPort = Item{Value: "70000", Source: "-consul-dns-port"} }, `-consul-dns-port "70000"`},
		{"dns ip", func(c *Config) { c.ConsulDNSIP = Item{Value: "consul.local", Source: "-consul-dns-ip"} }, `-consul-dns-ip "consul.local"`},
		{"dns ip zero", func(c *Config) { c.ConsulDNSIP = Item{Value: "0.0.0.0", Source: "-consul-dns-ip"} }, "unicast"},
		{"port octal", func(c *Config) { c.ExcludeInboundPorts = items("annotation x", "0443") }, "octal"},
		{"port zero", func(c *Config) { c.ExcludeOutboundPorts = items("-exclude-outbound-port", "0") }, `-exclude-outbound-port "0"`},
		{"port empty", func(c *Config) { c.ExcludeOutboundPorts = items("-exclude-outbound-port", "") }, "empty"},
		{"port range reversed", func(c *Config) { c.ExcludeInboundPorts = items("t", "90:80") }, "reversed"},
		{"port unknown name", func(c *Config) { c.ExcludeInboundPorts = items("t", "no-such-service-xyz") }, "unknown service"},
		{"port junk", func(c *Config) { c.ExcludeInboundPorts = items("t", "80;rm") }, "not a decimal number"},
		{"port name junk", func(c *Config) { c.ExcludeInboundPorts = items("t", "a;b") }, "neither"},
		{"cidr host name", func(c *Config) { c.ExcludeOutboundCIDRs = items("-exclude-outbound-cidr", "example.com") }, `-exclude-outbound-cidr "example.com"`},
		{"cidr bad mask", func(c *Config) { c.ExcludeOutboundCIDRs = items("t", "198.18.0.0/33") }, "CIDR"},
		{"cidr zone", func(c *Config) { c.ExcludeOutboundCIDRs = items("t", "fe80::1%eth0") }, "zone"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.mutate(&c)
			_, err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want error containing %q", err, tc.want)
			}
			var ve *ValueError
			if !errors.As(err, &ve) {
				t.Fatalf("error %T is not a *ValueError", err)
			}
		})
	}
}

func TestValidateReportsAllErrors(t *testing.T) {
	c := Config{ProxyUserID: it("x"), ProxyInboundPort: it("y"), ExcludeUIDs: items("u", "a", "b")}
	_, err := c.Validate()
	if err == nil || strings.Count(err.Error(), "invalid") != 4 {
		t.Fatalf("want 4 errors, got %v", err)
	}
}

// The proxy UID is exempt from outbound redirection, so a range there
// (audit F16: "0-4294967294") would exempt every process. Only a single UID
// is accepted; ranges stay allowed in ExcludeUIDs, as in Consul.
func TestValidateProxyUIDSingle(t *testing.T) {
	cases := []struct {
		uid, want, err string
	}{
		{uid: "5995", want: "5995"},
		{uid: " 0 ", want: "0"},
		{uid: "4294967294", want: "4294967294"},
		{uid: "7-7", want: "7"}, // a one-UID range is that UID
		{uid: "0-4294967294", err: "not a range"},
		{uid: "5995-5996", err: "not a range"},
		{uid: "1-2", err: "not a range"},
		{uid: "-5", err: "-proxy-uid"},
		{uid: "5-", err: "-proxy-uid"},
		{uid: "4294967295", err: "-proxy-uid"},
	}
	for _, tc := range cases {
		t.Run(tc.uid, func(t *testing.T) {
			c := Config{ProxyUserID: Item{Value: tc.uid, Source: "-proxy-uid"}, ProxyInboundPort: it("20000"),
				ExcludeUIDs: items("-exclude-uid", "10-20")}
			s, err := c.Validate()
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v (spec %+v), want error containing %q", err, s, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.ProxyUID != tc.want || strings.Join(s.ExcludeUIDs, ",") != "10-20" {
				t.Fatalf("got uid %q excl %v, want %q and 10-20", s.ProxyUID, s.ExcludeUIDs, tc.want)
			}
		})
	}
}
