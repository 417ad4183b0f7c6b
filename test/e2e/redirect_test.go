package e2e

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/listener"
	"github.com/ferrymesh/ferry/redirect"
	"github.com/ferrymesh/ferry/test/testbed"
)

var counters = regexp.MustCompile(`\s*\[\d+:\d+\]`)

// natTable is `iptables-save -t nat` (or ip6tables-save) of a pod with
// counters and comment lines stripped.
func natTable(t *testing.T, p *testbed.Pod, save string) string {
	t.Helper()
	out := p.ExecOK(t, testbed.Proc{}, save, "-t", "nat")
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		keep = append(keep, counters.ReplaceAllString(l, ""))
	}
	return strings.Join(keep, "\n")
}

func registerRedirectProxies(t *testing.T, tb *testbed.Testbed, pod *testbed.Pod) {
	t.Helper()
	agent := tb.Consul.Client.Agent()
	regs := []*api.AgentServiceRegistration{
		{
			ID: "rt-web", Name: "rt-web", Port: 8080, Address: pod.IP.String(),
			Checks: api.AgentServiceChecks{{
				CheckID: "rt-web-http", Name: "http", Interval: "1h",
				HTTP: "http://" + pod.IP.String() + ":8080/health",
			}},
		},
		{
			Kind: api.ServiceKindConnectProxy, ID: "rt-web-sidecar-proxy", Name: "rt-web-sidecar-proxy",
			Port: 21000, Address: pod.IP.String(),
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: "rt-web", DestinationServiceID: "rt-web", LocalServicePort: 8080,
				Mode:             api.ProxyModeTransparent,
				TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: 15002},
				Config: map[string]any{
					"bind_port":                  20001,
					"envoy_prometheus_bind_addr": "0.0.0.0:20200",
					"envoy_stats_bind_addr":      "0.0.0.0:9102",
				},
				Expose: api.ExposeConfig{Checks: true, Paths: []api.ExposePath{
					{ListenerPort: 20300, Path: "/live", LocalPathPort: 8080, Protocol: "http"},
					{ListenerPort: 20400, Path: "/ready", LocalPathPort: 8080, Protocol: "http"},
				}},
			},
		},
		{ID: "rt-api", Name: "rt-api", Port: 9090, Address: pod.IP.String()},
		{
			Kind: api.ServiceKindConnectProxy, ID: "rt-api-sidecar-proxy", Name: "rt-api-sidecar-proxy",
			Port: 20000, Address: pod.IP.String(),
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: "rt-api", DestinationServiceID: "rt-api", LocalServicePort: 9090,
				Mode: api.ProxyModeTransparent,
			},
		},
	}
	for _, r := range regs {
		if err := agent.ServiceRegister(r); err != nil {
			t.Fatalf("register %s: %v", r.ID, err)
		}
		id := r.ID
		t.Cleanup(func() { _ = agent.ServiceDeregister(id) })
	}
	// The agent assigns the exposed check port asynchronously with the
	// proxy registration; wait for it so both tools see the same state.
	deadline := time.Now().Add(10 * time.Second)
	for {
		checks, err := agent.ChecksWithFilter(`ServiceName == "rt-web"`)
		if err == nil && checks["rt-web-http"] != nil && checks["rt-web-http"].ExposedPort != 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("exposed check port never assigned: %v %v", checks, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type oracleCase struct {
	name     string
	consul   []string // consul connect redirect-traffic flags
	ferry    []string // ferry redirect flags; nil: the same as consul
	ferryEnv []string
	want     []string // strings the nat table must contain (proves the case exercises what it claims)
	// viaNetNS runs ferry on the host with -netns instead of inside the pod.
	viaNetNS bool
}

func oracleCases(annotations string) []oracleCase {
	min := []string{"-proxy-uid", "5995", "-proxy-inbound-port", "20000"}
	with := func(extra ...string) []string { return append(append([]string{}, min...), extra...) }
	all := with(
		"-proxy-outbound-port", "15001",
		"-consul-dns-ip", "127.0.0.1", "-consul-dns-port", "8600",
		"-exclude-inbound-port", "20200", "-exclude-inbound-port", "21000",
		"-exclude-inbound-port", "20300", "-exclude-inbound-port", "20400",
		"-exclude-outbound-port", "8080", "-exclude-outbound-port", "9090",
		"-exclude-outbound-cidr", "10.0.0.0/8", "-exclude-outbound-cidr", "169.254.169.254/32",
		"-exclude-uid", "5996", "-exclude-uid", "1234")
	return []oracleCase{
		{name: "minimal", consul: min, want: []string{"REDIRECT --to-ports 20000"}},
		{name: "outbound-port", consul: with("-proxy-outbound-port", "15002"), want: []string{"--to-ports 15002"}},
		{name: "exclude-inbound-ports", consul: with("-exclude-inbound-port", "20200", "-exclude-inbound-port", "21000", "-exclude-inbound-port", "8000:8100"), want: []string{"--dport 8000:8100 -j RETURN"}},
		{name: "exclude-outbound-ports", consul: with("-exclude-outbound-port", "8080", "-exclude-outbound-port", "9090", "-exclude-outbound-port", "https"), want: []string{"--dport 443 -j RETURN"}},
		{name: "exclude-outbound-cidrs", consul: with("-exclude-outbound-cidr", "198.18.0.0/15", "-exclude-outbound-cidr", "169.254.169.254/32", "-exclude-outbound-cidr", "10.0.0.0/8"), want: []string{"-d 198.18.0.0/15 -j RETURN"}},
		{name: "exclude-cidr-comma-list", consul: with("-exclude-outbound-cidr", "198.18.0.0/15,169.254.169.254"), want: []string{"-d 169.254.169.254/32 -j RETURN"}},
		{name: "exclude-uids", consul: with("-exclude-uid", "5996", "-exclude-uid", "1234", "-exclude-uid", "1000-2000"), want: []string{"--uid-owner 1000-2000"}},
		{name: "dns-port-mode", consul: with("-consul-dns-port", "8600"), want: []string{"--to-destination 127.0.0.1:8600"}},
		{name: "dns-port-mode-explicit-ip", consul: with("-consul-dns-ip", "198.18.0.53", "-consul-dns-port", "8600"), want: []string{"-d 198.18.0.53/32 -p udp"}},
		{name: "dns-ip-only-mode", consul: with("-consul-dns-ip", "198.18.0.53"), want: []string{"--to-destination 198.18.0.53"}},
		{name: "everything", consul: all, want: []string{"--uid-owner 1234"}},
		{name: "proxy-id-full", consul: []string{"-proxy-uid", "5995", "-proxy-id", "rt-web-sidecar-proxy", "-exclude-inbound-port", "7070"},
			viaNetNS: true, want: []string{
				"REDIRECT --to-ports 20001", "REDIRECT --to-ports 15002", // bind_port, OutboundListenerPort
				"--dport 20200 -j RETURN", "--dport 9102 -j RETURN", // prometheus, stats
				"--dport 20300 -j RETURN", "--dport 20400 -j RETURN", // Expose.Paths
				"--dport 215", // the agent-assigned exposed check port (21500-21755)
				"--dport 7070 -j RETURN"}},
		// In the pod: the second run's lookup passes the first run's rules
		// (TestRedirectProxyIDRerunInPod).
		{name: "proxy-id-plain", consul: []string{"-proxy-uid", "5995", "-proxy-id", "rt-api-sidecar-proxy", "-exclude-uid", "5996", "-consul-dns-port", "8600"},
			want: []string{"--to-ports 20000"}},
		{name: "netns-flag", consul: with("-exclude-uid", "5996", "-consul-dns-port", "8600"), viaNetNS: true, want: []string{"--uid-owner 5996"}},
		{name: "annotations", consul: with("-exclude-uid", "5996",
			"-exclude-inbound-port", "8080", "-exclude-inbound-port", "9090",
			"-exclude-outbound-port", "443",
			"-exclude-outbound-cidr", "198.18.0.0/15", "-exclude-outbound-cidr", "169.254.169.254/32",
			"-exclude-uid", "4242"),
			ferry: with("-exclude-uid", "5996", "-annotations", annotations), want: []string{"--uid-owner 4242"}},
		{name: "consul-k8s-json-env", consul: with("-consul-dns-ip", "127.0.0.1", "-consul-dns-port", "8600", "-exclude-uid", "5996"),
			ferry:    []string{},
			ferryEnv: []string{redirect.EnvRedirectConfig + `={"ConsulDNSIP":"127.0.0.1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`},
			want:     []string{"--uid-owner 5996"}},
	}
}

const testAnnotations = `consul.hashicorp.com/connect-inject="true"
consul.hashicorp.com/transparent-proxy="true"
consul.hashicorp.com/transparent-proxy-exclude-inbound-ports="8080, 9090"
consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs="198.18.0.0/15,169.254.169.254/32"
consul.hashicorp.com/transparent-proxy-exclude-outbound-ports="443"
consul.hashicorp.com/transparent-proxy-exclude-uids="4242"
`

// TestRedirectOracle runs Consul's own `consul connect redirect-traffic`
// and `ferry redirect` with the same inputs in two fresh pods and requires
// the same nat table; then checks that ferry's second run changes nothing
// and that -cleanup (of ferry's and of Consul's rules) restores the table.
func TestRedirectOracle(t *testing.T) {
	testbed.RequireRoot(t)
	consul, ferry := testbed.ConsulBinary(t), testbed.FerryBinary(t)
	tb := testbed.New(t)
	ann := filepath.Join(t.TempDir(), "annotations")
	if err := os.WriteFile(ann, []byte(testAnnotations), 0o644); err != nil {
		t.Fatal(err)
	}
	registerRedirectProxies(t, tb, tb.AddPod(t, "rt-svc"))

	for i, c := range oracleCases(ann) {
		t.Run(c.name, func(t *testing.T) {
			cp := tb.AddPod(t, fmt.Sprintf("oc%d", i))
			fp := tb.AddPod(t, fmt.Sprintf("of%d", i))
			// IPv4-only pods: Consul (1.14) installs IPv4 rules only, and
			// ferry must then do the same (with IPv6 on, even link-local
			// only, it adds IPv6 rules: TestRedirectIPv6LinkLocal).
			cp.DisableIPv6(t)
			fp.DisableIPv6(t)
			empty := natTable(t, fp, "iptables-save")

			out, err := cp.Exec(t, testbed.Proc{}, append([]string{consul, "connect", "redirect-traffic"}, c.consul...)...)
			if err != nil {
				t.Fatalf("consul connect redirect-traffic %s: %v\n%s", strings.Join(c.consul, " "), err, out)
			}
			fargs := c.ferry
			if fargs == nil {
				fargs = c.consul
			}
			runFerry := func() (string, error) {
				if !c.viaNetNS {
					return fp.Exec(t, testbed.Proc{Env: c.ferryEnv}, append([]string{ferry, "redirect"}, fargs...)...)
				}
				cmd := testbed.MustCommand(t, ferry, append([]string{"redirect", "-netns", fp.NSPath, "-http-addr", tb.Consul.HTTPAddr}, fargs...)...)
				cmd.Env = append(os.Environ(), c.ferryEnv...)
				out, err := cmd.CombinedOutput()
				return string(out), err
			}
			out, err = runFerry()
			if err != nil {
				t.Fatalf("ferry redirect %s: %v\n%s", strings.Join(fargs, " "), err, out)
			}
			want, got := natTable(t, cp, "iptables-save"), natTable(t, fp, "iptables-save")
			if got != want {
				t.Fatalf("nat tables differ\n--- consul\n%s\n--- ferry\n%s", want, got)
			}
			for _, w := range c.want {
				if !strings.Contains(got, w) {
					t.Fatalf("case does not exercise %q:\n%s", w, got)
				}
			}
			if v6 := natTable(t, fp, "ip6tables-save"); strings.Contains(v6, "CONSUL") {
				t.Fatalf("IPv6 rules in a pod without IPv6:\n%s", v6)
			}

			// Second run: a no-op (Consul's fails with "Chain already exists").
			out, err = runFerry()
			if err != nil || !strings.Contains(out, "nothing changed") {
				t.Fatalf("second run: %v\n%s", err, out)
			}
			if again := natTable(t, fp, "iptables-save"); again != got {
				t.Fatalf("second run changed the table\n%s", again)
			}

			// -cleanup restores the table, both after ferry and after Consul.
			for _, p := range []*testbed.Pod{fp, cp} {
				out := p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
				if !strings.Contains(out, "IPv4 traffic redirection rules removed") {
					t.Fatalf("cleanup in %s: %s", p.Name, out)
				}
				if after := natTable(t, p, "iptables-save"); after != empty {
					t.Fatalf("cleanup in %s left\n%s\nwant\n%s", p.Name, after, empty)
				}
				out = p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
				if !strings.Contains(out, "no traffic redirection rules to remove") {
					t.Fatalf("second cleanup in %s: %s", p.Name, out)
				}
			}
		})
	}
}

// TestRedirectBadInputLeavesTableUntouched feeds ferry bad values, through
// every input path, into a pod without rules and into one with rules; the
// command must fail naming the input, and the nat table must not change.
func TestRedirectBadInputLeavesTableUntouched(t *testing.T) {
	testbed.RequireRoot(t)
	ferry := testbed.FerryBinary(t)
	tb := testbed.New(t)
	dir := t.TempDir()
	writeAnn := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ok := []string{"-proxy-uid", "5995", "-proxy-inbound-port", "20000"}
	with := func(extra ...string) []string { return append(append([]string{}, ok...), extra...) }
	cases := []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"octal port", with("-exclude-inbound-port", "0443"), nil, `-exclude-inbound-port "0443"`},
		{"empty port", with("-exclude-outbound-port", ""), nil, "-exclude-outbound-port"},
		{"port out of range", with("-exclude-outbound-port", "70000"), nil, `"70000"`},
		{"host name cidr", with("-exclude-outbound-cidr", "example.com"), nil, `-exclude-outbound-cidr "example.com"`},
		{"bad mask", with("-exclude-outbound-cidr", "198.18.0.0/40"), nil, `"198.18.0.0/40"`},
		{"user name", with("-exclude-uid", "nobody"), nil, `-exclude-uid "nobody"`},
		{"dns ip", with("-consul-dns-ip", "999.1.1.1"), nil, `-consul-dns-ip "999.1.1.1"`},
		{"dns ip v6 without -ipv6", with("-consul-dns-ip", "::1", "-consul-dns-port", "8600"), nil, "-ipv6"},
		{"inbound port", []string{"-proxy-uid", "5995", "-proxy-inbound-port", "70000"}, nil, "-proxy-inbound-port"},
		{"no uid", []string{"-proxy-inbound-port", "20000"}, nil, "-proxy-uid"},
		{"annotation trailing comma", with("-annotations", writeAnn("a1", `consul.hashicorp.com/transparent-proxy-exclude-uids="5996,"`+"\n")), nil,
			"consul.hashicorp.com/transparent-proxy-exclude-uids"},
		{"annotation bad cidr", with("-annotations", writeAnn("a2", `consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs="198.18.0.0/15,nope"`+"\n")), nil,
			`annotation consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs "nope"`},
		{"annotation file syntax", with("-annotations", writeAnn("a3", "not an annotation\n")), nil, "line 1"},
		{"json env", nil, []string{redirect.EnvRedirectConfig + `={"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeInboundPorts":["20200",""]}`},
			redirect.EnvRedirectConfig + " field ExcludeInboundPorts"},
		{"json syntax", nil, []string{redirect.EnvRedirectConfig + `={"ProxyUserID":`}, redirect.EnvRedirectConfig},
		{"unknown proxy id", []string{"-proxy-uid", "5995", "-proxy-id", "no-such-proxy"}, nil, "no-such-proxy"},
		{"proxy id with ports", []string{"-proxy-uid", "5995", "-proxy-id", "x", "-proxy-inbound-port", "1"}, nil, "cannot be given together"},
	}
	fresh := tb.AddPod(t, "bad-fresh")
	used := tb.AddPod(t, "bad-used")
	// IPv4-only, so that an IPv6 DNS IP without -ipv6 is an error.
	fresh.DisableIPv6(t)
	used.DisableIPv6(t)
	used.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-exclude-uid", "5996", "-consul-dns-port", "8600")
	for _, p := range []*testbed.Pod{fresh, used} {
		before := natTable(t, p, "iptables-save")
		before6 := natTable(t, p, "ip6tables-save")
		for _, c := range cases {
			out, err := p.Exec(t, testbed.Proc{Env: c.env}, append([]string{ferry, "redirect"}, c.args...)...)
			if err == nil {
				t.Errorf("%s/%s: ferry redirect succeeded:\n%s", p.Name, c.name, out)
			} else if !strings.Contains(out, c.want) {
				t.Errorf("%s/%s: message does not name %q:\n%s", p.Name, c.name, c.want, out)
			}
			if after := natTable(t, p, "iptables-save"); after != before {
				t.Fatalf("%s/%s changed the table:\n%s\nwas\n%s", p.Name, c.name, after, before)
			}
			if after := natTable(t, p, "ip6tables-save"); after != before6 {
				t.Fatalf("%s/%s changed the IPv6 table:\n%s", p.Name, c.name, after)
			}
		}
	}

	// transparent-proxy "false": exit 0, a message, no rules.
	off := writeAnn("off", `consul.hashicorp.com/transparent-proxy="false"`+"\n")
	out := fresh.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-annotations", off)
	if !strings.Contains(out, "disabled") || strings.Contains(natTable(t, fresh, "iptables-save"), "CONSUL") {
		t.Fatalf("transparent-proxy=false: %s\n%s", out, natTable(t, fresh, "iptables-save"))
	}

	// -print needs no root and touches nothing.
	out = fresh.ExecOK(t, testbed.Proc{UID: 4242}, ferry, "redirect", "-print", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-ipv6")
	if !strings.Contains(out, "*nat") || !strings.Contains(out, "-d ::1/128 -j RETURN") {
		t.Fatalf("-print as UID 4242:\n%s", out)
	}
}

// TestRedirectIPv6 gives a pod a global IPv6 address (documentation
// prefix, no route anywhere) and checks the automatic ip6tables pass and
// per-family exclusions.
func TestRedirectIPv6(t *testing.T) {
	testbed.RequireRoot(t)
	ferry := testbed.FerryBinary(t)
	tb := testbed.New(t)
	p := tb.AddPod(t, "v6")
	p.ExecOK(t, testbed.Proc{}, "ip", "addr", "add", "2001:db8:f::2/64", "dev", "eth0", "nodad")
	before4, before6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save")

	args := []string{ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-consul-dns-port", "8600",
		"-exclude-outbound-cidr", "198.18.0.0/15", "-exclude-outbound-cidr", "2001:db8::/32", "-exclude-uid", "5996"}
	out := p.ExecOK(t, testbed.Proc{}, args...)
	if !strings.Contains(out, "IPv6 traffic redirection rules installed") {
		t.Fatalf("no IPv6 pass: %s", out)
	}
	v4, v6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save")
	for _, want := range []string{"-d 2001:db8::/32 -j RETURN", "-d ::1/128 -j RETURN", "--to-destination [::1]:8600", "--uid-owner 5996"} {
		if !strings.Contains(v6, want) {
			t.Errorf("IPv6 table lacks %q:\n%s", want, v6)
		}
	}
	if strings.Contains(v6, "198.18") || strings.Contains(v4, "2001:db8") {
		t.Errorf("exclusions leaked across families\n%s\n%s", v4, v6)
	}
	out = p.ExecOK(t, testbed.Proc{}, args...)
	if strings.Count(out, "nothing changed") != 2 {
		t.Fatalf("second run: %s", out)
	}
	p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
	if a4, a6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save"); a4 != before4 || a6 != before6 {
		t.Fatalf("cleanup left\n%s\n%s", a4, a6)
	}
	// -ipv6=false overrides the detection.
	out = p.ExecOK(t, testbed.Proc{}, append(args[:1:1], append([]string{"redirect", "-ipv6=false"}, args[2:]...)...)...)
	if strings.Contains(out, "IPv6") || strings.Contains(natTable(t, p, "ip6tables-save"), "CONSUL") {
		t.Fatalf("-ipv6=false still installed IPv6 rules: %s", out)
	}
	p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
}

// recorder is a TCP listener inside a pod's namespace that records the
// original destination of every connection and echoes its bytes back.
type recorder struct {
	ln   net.Listener
	mu   sync.Mutex
	dsts []netip.AddrPort
	errs []error
	wg   sync.WaitGroup
}

func listenIn(t *testing.T, pod *testbed.Pod, network, addr string) (ln net.Listener, pc net.PacketConn) {
	t.Helper()
	err := redirect.InNetNS(pod.NSPath, func() error {
		var err error
		if network == "udp" {
			pc, err = net.ListenPacket(network, addr)
		} else {
			ln, err = net.Listen(network, addr)
		}
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, pod.Name, err)
	}
	return ln, pc
}

func startRecorder(t *testing.T, pod *testbed.Pod, addr string) *recorder {
	t.Helper()
	ln, _ := listenIn(t, pod, "tcp", addr)
	r := &recorder{ln: ln}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer c.Close()
				tc := c.(*net.TCPConn)
				dst, err := listener.OriginalDst(tc)
				r.mu.Lock()
				if err != nil {
					r.errs = append(r.errs, err)
				} else {
					r.dsts = append(r.dsts, dst)
				}
				r.mu.Unlock()
				_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.Copy(tc, tc); err == nil {
					_ = tc.CloseWrite()
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); r.wg.Wait() })
	return r
}

func (r *recorder) saw(dst netip.AddrPort) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range r.dsts {
		if d == dst {
			return true
		}
	}
	return false
}

func (r *recorder) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprintf("dsts=%v errs=%v", r.dsts, r.errs)
}

// TestRedirectKernel checks what the rules do to real traffic.
func TestRedirectKernel(t *testing.T) {
	testbed.RequireRoot(t)
	ferry, echo := testbed.FerryBinary(t), testbed.EchoBinary(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "k-app")
	peer := tb.AddPod(t, "k-peer")
	peer2 := tb.AddPod(t, "k-peer2")

	app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000",
		"-consul-dns-port", "8600",
		"-exclude-outbound-port", "9999",
		"-exclude-outbound-cidr", peer2.IP.String()+"/32",
		"-exclude-uid", "4242",
		"-exclude-inbound-port", "7070")

	outbound := startRecorder(t, app, "127.0.0.1:15001")
	inbound := startRecorder(t, app, "0.0.0.0:20000")

	serve := func(p *testbed.Pod, addr string) {
		t.Helper()
		s := p.Start(t, testbed.Proc{}, echo, "server", "-addr", addr)
		if err := s.WaitOutput("ready", 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	serve(peer, ":7001")
	serve(peer, ":9999")
	serve(peer, ":7004")
	serve(peer2, ":7003")
	serve(app, "127.0.0.1:7777")
	serve(app, ":7070")

	ap := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	cases := []struct {
		name       string
		from       *testbed.Pod
		uid        int
		dst        netip.AddrPort
		rec        *recorder
		redirected bool
	}{
		{"app outbound is redirected to the outbound port", app, 1000, ap(peer.IP, 7005), outbound, true},
		{"root outbound is redirected too", app, 0, ap(peer.IP, 7006), outbound, true},
		{"proxy UID is not redirected", app, 5995, ap(peer.IP, 7001), outbound, false},
		{"excluded outbound port", app, 1000, ap(peer.IP, 9999), outbound, false},
		{"excluded outbound CIDR", app, 1000, ap(peer2.IP, 7003), outbound, false},
		{"excluded UID", app, 4242, ap(peer.IP, 7004), outbound, false},
		{"loopback is not redirected", app, 1000, ap(netip.MustParseAddr("127.0.0.1"), 7777), outbound, false},
		{"inbound from another pod goes to the inbound port", peer, 1000, ap(app.IP, 8080), inbound, true},
		{"excluded inbound port", peer, 1000, ap(app.IP, 7070), inbound, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, err := c.from.Exec(t, testbed.Proc{UID: c.uid}, echo, "client", "-addr", c.dst.String(), "-bytes", "100000", "-timeout", "10s")
			if err != nil || !strings.HasPrefix(out, "ok") {
				t.Fatalf("client as UID %d to %s: %v\n%s", c.uid, c.dst, err, out)
			}
			if got := c.rec.saw(c.dst); got != c.redirected {
				t.Fatalf("redirected=%v, want %v (listener saw %s)", got, c.redirected, c.rec)
			}
		})
	}

	t.Run("DNS to 127.0.0.1:53 lands on 127.0.0.1:8600", func(t *testing.T) {
		_, pc := listenIn(t, app, "udp", "127.0.0.1:8600")
		dnsTCP, _ := listenIn(t, app, "tcp", "127.0.0.1:8600")
		var wg sync.WaitGroup
		defer func() { pc.Close(); dnsTCP.Close(); wg.Wait() }()
		wg.Add(2)
		go func() { // UDP: answer "A:" + query
			defer wg.Done()
			buf := make([]byte, 512)
			n, from, err := pc.ReadFrom(buf)
			if err == nil {
				_, _ = pc.WriteTo(append([]byte("A:"), buf[:n]...), from)
			}
		}()
		go func() { // TCP: the same
			defer wg.Done()
			c, err := dnsTCP.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			buf := make([]byte, 512)
			n, _ := c.Read(buf)
			_, _ = c.Write(append([]byte("A:"), buf[:n]...))
		}()
		for _, network := range []string{"udp", "tcp"} {
			var reply string
			err := redirect.InNetNS(app.NSPath, func() error {
				c, err := net.DialTimeout(network, "127.0.0.1:53", 5*time.Second)
				if err != nil {
					return err
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write([]byte("query-" + network)); err != nil {
					return err
				}
				buf := make([]byte, 512)
				n, err := c.Read(buf)
				reply = string(buf[:n])
				return err
			})
			if err != nil {
				t.Fatalf("%s to 127.0.0.1:53: %v", network, err)
			}
			if reply != "A:query-"+network {
				t.Fatalf("%s reply %q", network, reply)
			}
		}
	})

	// Without the rules, nothing lands on the listeners any more.
	app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
	dst := ap(peer.IP, 7001)
	if out, err := app.Exec(t, testbed.Proc{UID: 1000}, echo, "client", "-addr", dst.String(), "-bytes", "1000"); err != nil {
		t.Fatalf("after cleanup: %v\n%s", err, out)
	}
	if outbound.saw(dst) {
		t.Fatal("redirected after cleanup")
	}
}

// TestRedirectProxyIDRerunInPod runs `ferry redirect -proxy-id` twice inside
// the pod, as an init container does again after a pod restart in the same
// network namespace. The second run's lookup of the registration must reach
// the agent although the first run's rules are in force (they would send it
// to the outbound port, where nothing listens), and must change nothing.
func TestRedirectProxyIDRerunInPod(t *testing.T) {
	testbed.RequireRoot(t)
	ferry := testbed.FerryBinary(t)
	tb := testbed.New(t)
	registerRedirectProxies(t, tb, tb.AddPod(t, "rr-svc"))
	p := tb.AddPod(t, "rr")
	// The pod's environment points CONSUL_HTTP_ADDR at the agent on the
	// bridge, an address the outbound rules capture.
	args := []string{ferry, "redirect", "-proxy-uid", "5995", "-proxy-id", "rt-web-sidecar-proxy", "-consul-dns-port", "8600"}
	out := p.ExecOK(t, testbed.Proc{}, args...)
	if !strings.Contains(out, "IPv4 traffic redirection rules installed") {
		t.Fatalf("first run: %s", out)
	}
	first := p.ExecOK(t, testbed.Proc{}, "iptables", "-t", "nat", "-S")
	if !strings.Contains(first, "REDIRECT --to-ports 15002") {
		t.Fatalf("first run did not install the registration's rules:\n%s", first)
	}
	for i := 0; i < 2; i++ {
		out, err := p.Exec(t, testbed.Proc{}, args...)
		if err != nil || !strings.Contains(out, "IPv4 traffic redirection rules already in place; nothing changed") {
			t.Fatalf("run %d: %v\n%s", i+2, err, out)
		}
		if again := p.ExecOK(t, testbed.Proc{}, "iptables", "-t", "nat", "-S"); again != first {
			t.Fatalf("run %d changed the nat table:\n%s\nwas\n%s", i+2, again, first)
		}
	}
	// The exemption is the proxy UID's and no one else's: an app's
	// connection to the agent is still redirected.
	out, err := p.Exec(t, testbed.Proc{UID: 1000}, ferry, "redirect", "-print", "-proxy-uid", "1000", "-proxy-id", "rt-web-sidecar-proxy")
	if err == nil || !strings.Contains(out, "connection refused") {
		t.Fatalf("a lookup as the app (UID 1000, not exempt) was not redirected: %v\n%s", err, out)
	}
}

// TestRedirectIPv6LinkLocal: a pod whose only IPv6 is the link-local
// address its eth0 gets by itself. A neighbour on the same bridge reaches a
// dual-stack app over [fe80::…%eth0] directly; after `ferry redirect` it
// must not (audit F8): the IPv6 rules are installed because IPv6 is on, and
// the redirected connection finds no IPv6 listener (fails closed).
func TestRedirectIPv6LinkLocal(t *testing.T) {
	testbed.RequireRoot(t)
	ferry, echo := testbed.FerryBinary(t), testbed.EchoBinary(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "ll-app")
	peer := tb.AddPod(t, "ll-peer")
	if out := app.ExecOK(t, testbed.Proc{}, "ip", "-6", "-o", "addr", "show", "scope", "global"); strings.TrimSpace(out) != "" {
		t.Fatalf("the app pod must have no global IPv6 address for this test:\n%s", out)
	}
	ll := app.LinkLocalIPv6(t)
	peer.LinkLocalIPv6(t)
	srv := app.Start(t, testbed.Proc{UID: 1000}, echo, "server", "-addr", ":7080") // Go's ":port" is dual-stack
	if err := srv.WaitOutput("ready", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	dst := net.JoinHostPort(ll.String()+"%eth0", "7080")
	connect := func() (string, error) {
		return peer.Exec(t, testbed.Proc{UID: 1000}, echo, "client", "-addr", dst, "-bytes", "1000", "-timeout", "5s")
	}
	// Without the rules the app is reachable over link-local IPv6.
	if out, err := connect(); err != nil || !strings.HasPrefix(out, "ok") {
		t.Fatalf("control: %s not reachable before the rules: %v\n%s", dst, err, out)
	}

	out := app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000")
	if !strings.Contains(out, "IPv6 traffic redirection rules installed") {
		t.Fatalf("no IPv6 rules in a pod with link-local IPv6:\n%s", out)
	}
	if v6 := natTable(t, app, "ip6tables-save"); !strings.Contains(v6, "REDIRECT --to-ports 20000") {
		t.Fatalf("IPv6 inbound not redirected:\n%s", v6)
	}
	if out, err := connect(); err == nil {
		t.Fatalf("a neighbour reached the app over link-local IPv6 past the redirect:\n%s", out)
	}

	// -ipv6=false is the explicit opt-out: IPv4 rules only.
	app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
	out = app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-ipv6=false", "-proxy-uid", "5995", "-proxy-inbound-port", "20000")
	if strings.Contains(out, "IPv6") || strings.Contains(natTable(t, app, "ip6tables-save"), "CONSUL") {
		t.Fatalf("-ipv6=false installed IPv6 rules:\n%s", out)
	}
	app.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")

	// IPv6 on but no ip6tables: fail before touching either table.
	bin := t.TempDir()
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, prog := range []string{"iptables", "iptables-restore", "iptables-save"} {
		if err := os.Symlink(testbed.Program(t, prog), filepath.Join(bin, prog)); err != nil {
			t.Fatal(err)
		}
	}
	before4, before6 := natTable(t, app, "iptables-save"), natTable(t, app, "ip6tables-save")
	out, err := app.Exec(t, testbed.Proc{Env: []string{"PATH=" + bin}}, ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000")
	if err == nil || !strings.Contains(out, "ip6tables") || !strings.Contains(out, "-ipv6=false") {
		t.Fatalf("without ip6tables in a pod with IPv6: %v\n%s", err, out)
	}
	if a4, a6 := natTable(t, app, "iptables-save"), natTable(t, app, "ip6tables-save"); a4 != before4 || a6 != before6 {
		t.Fatalf("the failed run changed the tables:\n%s\n%s", a4, a6)
	}
}
