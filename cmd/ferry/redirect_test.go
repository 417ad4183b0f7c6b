package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runRedirectForTest(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(append([]string{"redirect"}, args...), &out, &errb)
	code = exitCode(err, &errb)
	return out.String(), errb.String(), code
}

func TestRedirectPrint(t *testing.T) {
	t.Setenv("CONSUL_REDIRECT_TRAFFIC_CONFIG", "")
	out, errs, code := runRedirectForTest(t, "-print", "-proxy-uid", "5995", "-proxy-inbound-port", "20000",
		"-exclude-outbound-cidr", "198.18.0.0/15,2001:db8::/32", "-exclude-uid", "5996", "-exclude-uid", "1234", "-ipv6")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{
		"# ferry redirect: IPv4 rules for iptables-restore --noflush\n*nat\n",
		"# ferry redirect: IPv6 rules for ip6tables-restore --noflush\n*nat\n",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 1234 -j RETURN\n-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN\n-A CONSUL_PROXY_OUTPUT -d 198.18.0.0/15 -j RETURN\n",
		"-A CONSUL_PROXY_OUTPUT -d 2001:db8::/32 -j RETURN\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "COMMIT\n") != 2 {
		t.Errorf("want two tables:\n%s", out)
	}
}

func TestRedirectPrintFromConsulK8sJSON(t *testing.T) {
	t.Setenv("CONSUL_REDIRECT_TRAFFIC_CONFIG", `{"ConsulDNSIP":"127.0.0.1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`)
	// Flags add to the JSON's lists and override its scalars.
	out, errs, code := runRedirectForTest(t, "-print", "-exclude-uid", "4242", "-proxy-inbound-port", "20001")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 4242 -j RETURN\n-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN\n",
		"--to-destination 127.0.0.1:8600",
		"-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20001\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRedirectUsageErrors(t *testing.T) {
	t.Setenv("CONSUL_REDIRECT_TRAFFIC_CONFIG", "")
	ann := filepath.Join(t.TempDir(), "annotations")
	if err := os.WriteFile(ann, []byte(`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports="80,"`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-print", "-proxy-inbound-port", "20000"}, "-proxy-uid is required"},
		{[]string{"-print", "-proxy-uid", "5995"}, "either -proxy-id or -proxy-inbound-port"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-id", "x", "-proxy-outbound-port", "15001"}, "cannot be given together"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-node-name", "n"}, "-node-name requires -proxy-id"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-exclude-uid", "a,,b"}, `-exclude-uid "a,,b"`},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-exclude-outbound-cidr", "nope"}, `-exclude-outbound-cidr "nope"`},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-consul-dns-ip", "::1"}, "-ipv6"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-annotations", ann}, "transparent-proxy-exclude-inbound-ports"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-annotations", ann + ".missing"}, "-annotations"},
		{[]string{"-print", "-proxy-uid", "5995", "-proxy-inbound-port", "x"}, "invalid value"},
		{[]string{"-proxy-uid", "5995", "-proxy-inbound-port", "1", "extra"}, "unexpected arguments"},
	} {
		_, errs, code := runRedirectForTest(t, tc.args...)
		if code != 2 || !strings.Contains(errs, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and %q", tc.args, code, errs, tc.want)
		}
	}
}

func TestRedirectDisabledByAnnotation(t *testing.T) {
	t.Setenv("CONSUL_REDIRECT_TRAFFIC_CONFIG", "")
	ann := filepath.Join(t.TempDir(), "annotations")
	if err := os.WriteFile(ann, []byte(`consul.hashicorp.com/transparent-proxy="false"`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, code := runRedirectForTest(t, "-proxy-uid", "5995", "-proxy-inbound-port", "1", "-annotations", ann)
	if code != 0 || !strings.Contains(out, "disabled") {
		t.Fatalf("exit %d: %s", code, out)
	}
}

func TestRedirectHelp(t *testing.T) {
	var out, errb bytes.Buffer
	err := run([]string{"redirect", "-h"}, &out, &errb)
	if code := exitCode(err, &errb); code != 0 || !errors.Is(err, errHelp) {
		t.Fatalf("exit %d err %v", code, err)
	}
	for _, flag := range []string{"-proxy-uid", "-proxy-id", "-exclude-outbound-cidr", "-consul-dns-port", "-netns", "-http-addr", "-token", "-cleanup", "-print", "-ipv6", "-annotations"} {
		if !strings.Contains(errb.String(), flag) {
			t.Errorf("help lacks %s", flag)
		}
	}
}

// TestRedirectPrintDualStack: consul-k8s's dual-stack mode (CONSUL_DUAL_STACK
// or the consul.hashicorp.com/dual-stack annotation, with DNS on ::1) asks
// for the IPv6 rules as -ipv6 does: Consul's dual-stack rule set.
func TestRedirectPrintDualStack(t *testing.T) {
	t.Setenv("CONSUL_REDIRECT_TRAFFIC_CONFIG", `{"ConsulDNSIP":"::1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`)
	check := func(t *testing.T, args ...string) {
		t.Helper()
		out, errs, code := runRedirectForTest(t, args...)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		v4, v6, ok := strings.Cut(out, "# ferry redirect: IPv6 rules")
		if !ok || strings.Contains(v4, "-A CONSUL_DNS_REDIRECT") || strings.Contains(v4, "dport 53") {
			t.Fatalf("want IPv4 rules without DNS, then IPv6 rules:\n%s", out)
		}
		if !strings.Contains(v6, "-A CONSUL_DNS_REDIRECT -d ::1/128 -p udp -m udp --dport 53 -j DNAT --to-destination [::1]:8600") {
			t.Fatalf("IPv6 rules lack the DNS DNAT to [::1]:8600:\n%s", v6)
		}
	}
	t.Run("env", func(t *testing.T) {
		t.Setenv("CONSUL_DUAL_STACK", "true")
		check(t, "-print")
	})
	t.Run("annotation", func(t *testing.T) {
		t.Setenv("CONSUL_DUAL_STACK", "")
		ann := filepath.Join(t.TempDir(), "annotations")
		if err := os.WriteFile(ann, []byte(`consul.hashicorp.com/dual-stack="true"`+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		check(t, "-print", "-annotations", ann)
	})
	t.Run("not dual-stack: the IPv6 DNS IP needs -ipv6", func(t *testing.T) {
		t.Setenv("CONSUL_DUAL_STACK", "false")
		if _, errs, code := runRedirectForTest(t, "-print"); code != 2 || !strings.Contains(errs, "-ipv6") {
			t.Fatalf("exit %d: %s", code, errs)
		}
	})
	t.Run("bad value", func(t *testing.T) {
		t.Setenv("CONSUL_DUAL_STACK", "maybe")
		if _, errs, code := runRedirectForTest(t, "-print"); code != 2 || !strings.Contains(errs, "CONSUL_DUAL_STACK") {
			t.Fatalf("exit %d: %s", code, errs)
		}
	})
}
