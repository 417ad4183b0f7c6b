package e2e

import (
	"bufio"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// consul-k8s's dual-stack mode (global.dualStack.enabled): the redirect
// configuration names ::1 as the DNS address and the DNS proxy binds
// [::1]:8600 (shared/reference/redirect.md §1.6, consul-k8s.md). The pod's
// resolver asks ::1.
const v6DualStackJSON = `{"ConsulDNSIP":"::1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`

// v6DualStackRules are sdk/iptables v0.17+'s rules for that configuration
// with dualStack=true, as the reference documents them: the IPv4 pass is
// the default pod's without any DNS rule, the IPv6 pass the same with ::1
// for 127.0.0.1 and the DNS rules for [::1]:8600. (Consul v1.14.11, the
// testbed's oracle, predates dual-stack: its redirect-traffic never
// touches ip6tables.)
var v6DualStackRules = map[string][]string{
	"iptables-save": {
		"-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
		"-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
		"-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
		"-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
		"-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
	},
	"ip6tables-save": {
		"-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
		"-A OUTPUT -d ::1/128 -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT",
		"-A OUTPUT -d ::1/128 -p tcp -m tcp --dport 53 -j CONSUL_DNS_REDIRECT",
		"-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
		"-A CONSUL_DNS_REDIRECT -d ::1/128 -p udp -m udp --dport 53 -j DNAT --to-destination [::1]:8600",
		"-A CONSUL_DNS_REDIRECT -d ::1/128 -p tcp -m tcp --dport 53 -j DNAT --to-destination [::1]:8600",
		"-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
		"-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -d ::1/128 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
		"-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
	},
}

// natRulesByChain returns the -A lines of a pod's nat table by chain, each
// chain's in kernel order (iptables-save orders the chains by name).
func natRulesByChain(t *testing.T, p *testbed.Pod, save string) map[string][]string {
	t.Helper()
	m := map[string][]string{}
	for _, l := range strings.Split(natTable(t, p, save), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "-A" {
			m[f[1]] = append(m[f[1]], l)
		}
	}
	return m
}

// TestIPv6DNS: a dual-stack pod set up as consul-k8s's dual-stack mode sets
// it up. `ferry redirect` takes the dual-stack configuration (DNS on ::1)
// and installs the rules the reference documents for both families;
// `ferry run -dns-addr [::1]:8600` answers the pod's resolver on ::1: A and
// AAAA of mesh names as Consul's own DNS answers them (the virtual IPs are
// IPv4: AAAA is NOERROR with no answer), AAAA of other names forwarded.
func TestIPv6DNS(t *testing.T) {
	testbed.RequireRoot(t)
	ferry, echo, tool := testbed.FerryBinary(t), testbed.EchoBinary(t), dnsBuildApp(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "dns6app")
	backend := tb.AddPod(t, "dns6be")
	recPod := tb.AddPod(t, "dns6rec")
	for _, p := range []*testbed.Pod{app, backend, recPod} {
		p.AddIPv6(t)
	}
	appReg := tb.Register(t, testbed.Service{Name: "client6", Pod: app, Port: 9090, Address: app.IP6})
	beReg := tb.Register(t, testbed.Service{Name: "backend6", Pod: backend, Port: 8080, Address: backend.IP6})

	rec := recPod.Start(t, testbed.Proc{Name: "recursor"}, tool, "static", "-addr", ":53",
		"-record", "ext6.example.test=198.18.77.77", "-record", "ext6.example.test=2001:db8:77::77")
	if err := rec.WaitOutput("ready", 20*time.Second); err != nil {
		t.Fatalf("recursor: %v", err)
	}
	meshEchoServer(t, backend, "backend6 app", "127.0.0.1:8080")
	if err := os.WriteFile(filepath.Join("/etc/netns", app.NS, "resolv.conf"), []byte("nameserver ::1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	out := app.ExecOK(t, testbed.Proc{Name: "ferry redirect", Env: []string{"CONSUL_REDIRECT_TRAFFIC_CONFIG=" + v6DualStackJSON, "CONSUL_DUAL_STACK=true"}}, ferry, "redirect")
	if !strings.Contains(out, "IPv4 traffic redirection rules installed") || !strings.Contains(out, "IPv6 traffic redirection rules installed") {
		t.Fatalf("ferry redirect with the dual-stack configuration:\n%s", out)
	}
	for save, want := range v6DualStackRules {
		got := natRulesByChain(t, app, save)
		wantBy := map[string][]string{}
		for _, l := range want {
			c := strings.Fields(l)[1]
			wantBy[c] = append(wantBy[c], l)
		}
		for c := range got {
			if !slices.Equal(got[c], wantBy[c]) {
				t.Errorf("%s chain %s:\n got %q\nwant %q", save, c, got[c], wantBy[c])
			}
		}
		for c := range wantBy {
			if _, ok := got[c]; !ok {
				t.Errorf("%s: chain %s has no rules, want %q", save, c, wantBy[c])
			}
		}
	}
	out = app.ExecOK(t, testbed.Proc{Name: "ferry redirect", Env: []string{"CONSUL_REDIRECT_TRAFFIC_CONFIG=" + v6DualStackJSON, "CONSUL_DUAL_STACK=true"}}, ferry, "redirect")
	if strings.Count(out, "nothing changed") != 2 {
		t.Fatalf("second run must change neither family:\n%s", out)
	}

	// The backend pod the way ferry's own docs set it up: DNS rules in
	// port mode without an IP (each family's loopback), ferry's DNS on its
	// default address 127.0.0.1:8600, which also binds [::1]:8600.
	beFerry := dnsSidecar(t, backend, ferry, beReg.ProxyID, "-dns-recursor", recPod.IP6.String())
	dnsWaitReady(t, backend, beFerry)
	// consul-k8s's dual-stack binds: DNS and admin on ::1.
	appFerry := app.Start(t, testbed.Proc{UID: meshProxyUID, Name: "ferry run " + app.Name}, ferry, "run", "-proxy-id", appReg.ProxyID,
		"-dns-addr", "[::1]:8600", "-admin-addr", "[::1]:19000", "-dns-recursor", recPod.IP6.String(), "-consul-dns-addr", tb.Consul.DNSAddr)
	took := meshPoll(t, "ferry ready on [::1]:19000", 30*time.Second, func() bool {
		select {
		case <-appFerry.Done():
			t.Fatalf("ferry exited:\n%s", appFerry.Output())
		default:
		}
		return v6AdminGet(app, "[::1]:19000", "/ready") == 200
	})
	t.Logf("ferry ready on [::1]:19000 after %v", took.Round(time.Millisecond))
	vip := meshVIP(t, tb, "backend6")

	query := func(p *testbed.Pod, server, name, qtype string) string {
		out, err := p.Exec(t, testbed.Proc{}, tool, "query", "-server", server, name, qtype)
		if err != nil {
			t.Fatalf("query %s %s at %s in %s: %v\n%s", name, qtype, server, p.Name, err, out)
		}
		return strings.TrimSpace(out)
	}
	ferryDNS := "[::1]:53" // through the IPv6 DNAT rule
	waitFor(t, "ferry answers the backend6 VIP over ::1", 20*time.Second, func() bool {
		return strings.Contains(query(app, ferryDNS, "backend6.virtual.consul", "A"), vip)
	})
	// The oracle: the agent's own DNS (asked from the recursor pod, which
	// has no rules) for the same questions. Consul v1.14.11 answers an
	// AAAA question for a virtual name with the IPv4 VIP as an A record
	// (the wrong type for the question); ferry answers NOERROR with no
	// record. Either way a resolver gets no IPv6 address, and the A
	// answers are the same VIP.
	ferryA, consulA := query(app, ferryDNS, "backend6.virtual.consul", "A"), query(recPod, tb.Consul.DNSAddr, "backend6.virtual.consul", "A")
	if !strings.HasPrefix(ferryA, "NOERROR") || answerRecords(ferryA, "A") != answerRecords(consulA, "A") {
		t.Errorf("backend6.virtual.consul A: ferry %q, Consul %q", ferryA, consulA)
	}
	ferry6, consul6 := query(app, ferryDNS, "backend6.virtual.consul", "AAAA"), query(recPod, tb.Consul.DNSAddr, "backend6.virtual.consul", "AAAA")
	t.Logf("backend6.virtual.consul AAAA: ferry %q, Consul %q", ferry6, consul6)
	if ferry6 != "NOERROR" || !strings.HasPrefix(consul6, "NOERROR") || answerRecords(consul6, "AAAA") != "" {
		t.Errorf("backend6.virtual.consul AAAA: ferry %q (want NOERROR, no record), Consul %q (want no AAAA record)", ferry6, consul6)
	}
	// <svc>.service.consul is a mesh name too: ferry answers it with the
	// VIP (so that connections are routed by it, mTLS included) where the
	// agent gives the instances' addresses, here IPv6 ones (documented).
	if got := query(app, ferryDNS, "backend6.service.consul", "A"); !strings.Contains(got, vip) {
		t.Errorf("backend6.service.consul A: %q, want the VIP %s", got, vip)
	}
	if got := query(app, ferryDNS, "backend6.service.consul", "AAAA"); got != "NOERROR" {
		t.Errorf("backend6.service.consul AAAA: %q, want NOERROR with no record", got)
	}
	t.Logf("backend6.service.consul AAAA from the agent: %q", query(recPod, tb.Consul.DNSAddr, "backend6.service.consul", "AAAA"))
	if got := query(app, ferryDNS, "ext6.example.test", "AAAA"); !strings.Contains(got, "2001:db8:77::77") {
		t.Errorf("AAAA forwarded to the recursor: %q", got)
	}
	if got := query(app, ferryDNS, "ext6.example.test", "A"); !strings.Contains(got, "198.18.77.77") {
		t.Errorf("A forwarded to the recursor: %q", got)
	}
	if !strings.Contains(rec.Output(), "query ext6.example.test. AAAA") {
		t.Errorf("the recursor never saw the AAAA question:\n%s", rec.Output())
	}
	for _, server := range []string{"127.0.0.1:53", "[::1]:53"} {
		if got := query(backend, server, "ext6.example.test", "AAAA"); !strings.Contains(got, "2001:db8:77::77") {
			t.Errorf("backend pod, %s (default -dns-addr): %q", server, got)
		}
	}
	// By name, through the pod's resolver (nameserver ::1) and the mesh.
	if out, err := app.Exec(t, testbed.Proc{Name: "echo client"}, echo, "client",
		"-addr", "backend6.virtual.consul:8080", "-bytes", "65536", "-timeout", "10s"); err != nil || !strings.HasPrefix(out, "ok") {
		t.Errorf("echo client -addr backend6.virtual.consul:8080: %v\n%s", err, out)
	}
}

// answerRecords returns the data of the answer records of type rrtype in a
// query tool answer, sorted and joined.
func answerRecords(out, rrtype string) string {
	var recs []string
	for _, l := range strings.Split(out, "\n")[1:] {
		if f := strings.Fields(l); len(f) == 5 && f[3] == rrtype {
			recs = append(recs, f[4])
		}
	}
	slices.Sort(recs)
	return strings.Join(recs, " ")
}

// v6AdminGet GETs path from ferry's admin listener at addr inside pod and
// returns the status code (0 when there is no answer).
func v6AdminGet(pod *testbed.Pod, addr, path string) int {
	c, err := meshDialIn(pod, addr, 2*time.Second)
	if err != nil {
		return 0
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("GET " + path + " HTTP/1.0\r\n\r\n")); err != nil {
		return 0
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}
