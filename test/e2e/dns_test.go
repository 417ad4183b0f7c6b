package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// The sidecar's DNS server end to end. Until `ferry run` serves DNS, the
// server runs in the app pod through test/dnsapp (package dns with the
// proxy/catalog mesh view of the real agent). The pod's DNS goes through
// the Consul-compatible port-mode rules (127.0.0.1:53 -> 127.0.0.1:8600),
// and the app resolves through the ordinary libc resolver (getent), which
// reads the pod's resolv.conf (nameserver 127.0.0.1). A stand-in recursor
// runs in its own pod.
func TestDNS(t *testing.T) {
	testbed.RequireRoot(t)
	bin := dnsBuildApp(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "dnsapp")
	backend := tb.AddPod(t, "dnsbe")
	recPod := tb.AddPod(t, "dnsrec")
	tb.Register(t, testbed.Service{Name: "backend", Pod: backend, Port: 8080})
	var vip string
	waitFor(t, "backend VIP", 20*time.Second, func() bool {
		v, err := tb.VirtualIP("backend")
		vip = v
		return err == nil
	})
	self, err := tb.Consul.Client.Agent().Self()
	if err != nil {
		t.Fatal(err)
	}
	dc, _ := self["Config"]["Datacenter"].(string)

	rec := recPod.Start(t, testbed.Proc{Name: "recursor"}, bin, "static", "-addr", ":53",
		"-record", "ext.example.test=198.18.77.77", "-big", "big.example.test")
	if err := rec.WaitOutput("ready", 20*time.Second); err != nil {
		t.Fatalf("recursor: %v\n%s", err, rec.Output())
	}
	// Port mode of redirect.md §1.5 (rules 7a'-7d').
	for _, r := range [][]string{
		{"-N", "CONSUL_DNS_REDIRECT"},
		{"-A", "CONSUL_DNS_REDIRECT", "-p", "udp", "-d", "127.0.0.1", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.1:8600"},
		{"-A", "CONSUL_DNS_REDIRECT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.1:8600"},
		{"-A", "OUTPUT", "-p", "udp", "-d", "127.0.0.1", "--dport", "53", "-j", "CONSUL_DNS_REDIRECT"},
		{"-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "53", "-j", "CONSUL_DNS_REDIRECT"},
	} {
		app.ExecOK(t, testbed.Proc{}, append([]string{"iptables", "-t", "nat"}, r...)...)
	}
	srv := app.Start(t, testbed.Proc{Name: "dns"}, bin, "serve", "-addr", "127.0.0.1:8600",
		"-recursor", recPod.IP.String()+":53", "-consul-dns", tb.Consul.DNSAddr)
	if err := srv.WaitOutput("ready", 30*time.Second); err != nil {
		t.Fatalf("dns server: %v\n%s", err, srv.Output())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dns server output:\n%s\nrecursor output:\n%s", srv.Output(), rec.Output())
		}
	})

	// getent hosts asks AAAA first (NODATA for an IPv4 VIP), then A.
	resolve := func(t *testing.T, name string, env ...string) (string, error) {
		out, err := app.Exec(t, testbed.Proc{Env: env}, "getent", "hosts", name)
		f := strings.Fields(out)
		if err != nil || len(f) == 0 {
			return "", err
		}
		return f[0], nil
	}
	meshNames := []string{
		"backend.default.svc.cluster.local",
		"backend.virtual.consul",
		"backend.service.consul",
		"backend.service." + dc + ".consul",
		"Backend.Default.Svc.Cluster.Local.",
	}
	for _, mode := range []struct {
		name string
		env  []string
	}{{"udp", nil}, {"tcp", []string{"RES_OPTIONS=use-vc"}}} {
		t.Run(mode.name, func(t *testing.T) {
			for _, name := range meshNames {
				if got, err := resolve(t, name, mode.env...); got != vip {
					t.Errorf("%s: got %q (%v), want the backend VIP %s", name, got, err, vip)
				}
			}
			if got, err := resolve(t, "ext.example.test", mode.env...); got != "198.18.77.77" {
				t.Errorf("non-mesh name: got %q (%v), want the recursor's 198.18.77.77", got, err)
			}
			if got, err := resolve(t, "nosuch.default.svc.cluster.local", mode.env...); err == nil {
				t.Errorf("unknown cluster name resolved to %q", got)
			}
		})
	}
	// The resolver really used TCP in the second round: the nat counters
	// of the TCP DNAT rule count one packet per connection.
	if n := dnsRuleCount(t, app, "tcp"); n < int64(len(meshNames)) {
		t.Errorf("TCP DNAT rule matched %d connections, want at least %d", n, len(meshNames))
	}
	query := func(args ...string) string {
		out, err := app.Exec(t, testbed.Proc{}, append([]string{bin, "query"}, args...)...)
		if err != nil {
			t.Fatalf("query %v: %v\n%s", args, err, out)
		}
		return out
	}
	// Not mesh names, or not A/AAAA: the agent's DNS answers.
	if out := query("-server", "127.0.0.1:53", "nosuch.virtual.consul", "A"); !strings.HasPrefix(out, "NXDOMAIN") {
		t.Errorf("nosuch.virtual.consul: %s", out)
	}
	if out := query("-server", "127.0.0.1:53", "backend.service.consul", "SRV"); !strings.Contains(out, "\tSRV\t") {
		t.Errorf("SRV from the agent: %s", out)
	}
	if out := query("-server", "127.0.0.1:53", "backend-sidecar-proxy.service.consul", "A"); !strings.Contains(out, backend.IP.String()) {
		t.Errorf("non-mesh Consul service from the agent: want %s, got %s", backend.IP, out)
	}
	// The recursor truncates this over UDP: ferry must retry over TCP and
	// hand the whole answer to a TCP client.
	if out := query("-tcp", "-server", "127.0.0.1:53", "big.example.test", "A"); strings.Count(out, "\tA\t") != 100 {
		t.Errorf("big answer over TCP: want 100 records, got\n%s", out)
	}
	if !strings.Contains(rec.Output(), "query big.example.test. A tcp=true") {
		t.Errorf("ferry did not retry the truncated answer over TCP:\n%s", rec.Output())
	}

	// Garbage through the DNAT and straight at the listener.
	for _, addr := range []string{"127.0.0.1:53", "127.0.0.1:8600"} {
		if out, err := app.Exec(t, testbed.Proc{}, bin, "garbage", "-server", addr, "-n", "5000"); err != nil {
			t.Fatalf("garbage: %v\n%s", err, out)
		}
	}
	select {
	case <-srv.Done():
		t.Fatalf("dns server died:\n%s", srv.Output())
	default:
	}
	if got, err := resolve(t, "backend.default.svc.cluster.local"); got != vip {
		t.Errorf("after garbage: got %q (%v), want %s", got, err, vip)
	}
	if got, err := resolve(t, "ext.example.test", "RES_OPTIONS=use-vc"); got != "198.18.77.77" {
		t.Errorf("after garbage over TCP: got %q (%v)", got, err)
	}
}

// dnsRuleCount returns the packet counter of the DNAT rule for proto in
// the pod's CONSUL_DNS_REDIRECT chain.
func dnsRuleCount(t *testing.T, p *testbed.Pod, proto string) int64 {
	t.Helper()
	out := p.ExecOK(t, testbed.Proc{}, "iptables", "-t", "nat", "-L", "CONSUL_DNS_REDIRECT", "-v", "-n", "-x")
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 3 && f[2] == "DNAT" && (f[3] == proto || f[3] == map[string]string{"tcp": "6", "udp": "17"}[proto]) {
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				t.Fatalf("counter in %q: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("no %s DNAT rule in:\n%s", proto, out)
	return 0
}

// dnsBuildApp builds test/dnsapp into a directory any pod user can read.
func dnsBuildApp(t *testing.T) string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "dnsapp")
	cmd := exec.Command("go", "build", "-o", out, "./test/dnsapp")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build dnsapp: %v\n%s", err, b)
	}
	return out
}
