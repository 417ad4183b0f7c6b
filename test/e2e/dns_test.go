package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// The sidecar's DNS server end to end, through `ferry run` in meshed pods:
// `ferry redirect -consul-dns-port 8600` (Consul's port-mode DNS rules,
// 127.0.0.1:53 -> 127.0.0.1:8600) and `ferry run` as UID 5995. The app
// resolves through the pod's ordinary resolvers (glibc's getent, and the Go
// resolver of test/echo), which read the pod's resolv.conf (nameserver
// 127.0.0.1). A stand-in recursor (test/dnsapp static) runs in its own pod.
//
// Pods: dnsapp (the client app, service "client"; ferry with
// -dns-recursor <recursor pod>), dnsbe (service "backend", echo server;
// its resolv.conf also names the recursor, so its ferry runs with the
// default recursors) and dnsrec (the recursor).
func TestDNS(t *testing.T) {
	testbed.RequireRoot(t)
	ferry, echo, tool := testbed.FerryBinary(t), testbed.EchoBinary(t), dnsBuildApp(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "dnsapp")
	backend := tb.AddPod(t, "dnsbe")
	recPod := tb.AddPod(t, "dnsrec")
	appReg := tb.Register(t, testbed.Service{Name: "client", Pod: app, Port: 9090})
	beReg := tb.Register(t, testbed.Service{Name: "backend", Pod: backend, Port: 8080})

	rec := recPod.Start(t, testbed.Proc{Name: "recursor"}, tool, "static", "-addr", ":53",
		"-record", "ext.example.test=198.18.77.77", "-big", "big.example.test")
	if err := rec.WaitOutput("ready", 20*time.Second); err != nil {
		t.Fatalf("recursor: %v", err)
	}
	srv := backend.Start(t, testbed.Proc{Name: "backend-echo"}, echo, "server", "-addr", "127.0.0.1:8080", "-quiet")
	if err := srv.WaitOutput("ready", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// A consul-k8s pod with DNS redirection: 127.0.0.1 first, then the
	// cluster's DNS. The backend's ferry (default recursors, DNS on the
	// wildcard address, which the DNATed 127.0.0.1:53 also reaches) must
	// forward to the latter only: 127.0.0.1:53 is itself.
	if err := os.WriteFile(filepath.Join("/etc/netns", backend.NS, "resolv.conf"),
		[]byte("nameserver 127.0.0.1\nnameserver "+recPod.IP.String()+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	beFerry := dnsSidecar(t, backend, ferry, beReg.ProxyID, "-consul-dns-addr", tb.Consul.DNSAddr,
		"-dns-addr", "0.0.0.0:8600")
	appFerry := dnsSidecar(t, app, ferry, appReg.ProxyID, "-consul-dns-addr", tb.Consul.DNSAddr,
		"-dns-recursor", recPod.IP.String())
	dnsWaitReady(t, backend, beFerry)
	dnsWaitReady(t, app, appFerry)

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
	// The view may learn the VIP a moment after /ready (it is assigned when
	// the sidecar registers); wait for the first name, then expect all.
	waitFor(t, "ferry resolves the backend VIP", 20*time.Second, func() bool {
		got, _ := resolve(t, meshNames[0])
		return got == vip
	})
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

	// Connect by name: the Go resolver (test/echo is a static binary) asks
	// 127.0.0.1, gets the VIP, and the connection goes through both
	// sidecars over mTLS (the backend's ferry refuses anything else).
	inbound := dnsMetricSum(t, backend, `ferry_connections_total{direction="inbound"`)
	for _, name := range meshNames[:3] {
		if out, err := app.Exec(t, testbed.Proc{Name: "echo client"}, echo, "client",
			"-addr", name+":8080", "-bytes", "65536", "-timeout", "10s"); err != nil || !strings.Contains(out, "ok") {
			t.Errorf("echo client -addr %s:8080: %v\n%s", name, err, out)
		}
	}
	if got := dnsMetricSum(t, backend, `ferry_connections_total{direction="inbound"`) - inbound; got < 3 {
		t.Errorf("backend's ferry saw %d new inbound connections, want 3", got)
	}

	query := func(p *testbed.Pod, args ...string) string {
		out, err := p.Exec(t, testbed.Proc{}, append([]string{tool, "query"}, args...)...)
		if err != nil {
			t.Fatalf("query %v in %s: %v\n%s", args, p.Name, err, out)
		}
		return out
	}
	// Not mesh names, or not A/AAAA: the agent's DNS answers.
	if out := query(app, "-server", "127.0.0.1:53", "nosuch.virtual.consul", "A"); !strings.HasPrefix(out, "NXDOMAIN") {
		t.Errorf("nosuch.virtual.consul: %s", out)
	}
	if out := query(app, "-server", "127.0.0.1:53", "backend.service.consul", "SRV"); !strings.Contains(out, "\tSRV\t") {
		t.Errorf("SRV from the agent: %s", out)
	}
	if out := query(app, "-server", "127.0.0.1:53", "backend-sidecar-proxy.service.consul", "A"); !strings.Contains(out, backend.IP.String()) {
		t.Errorf("non-mesh Consul service from the agent: want %s, got %s", backend.IP, out)
	}
	// The recursor truncates this over UDP: ferry must retry over TCP and
	// hand the whole answer to a TCP client.
	if out := query(app, "-tcp", "-server", "127.0.0.1:53", "big.example.test", "A"); strings.Count(out, "\tA\t") != 100 {
		t.Errorf("big answer over TCP: want 100 records, got\n%s", out)
	}
	if !strings.Contains(rec.Output(), "query big.example.test. A tcp=true") {
		t.Errorf("ferry did not retry the truncated answer over TCP:\n%s", rec.Output())
	}

	// The backend's ferry took its recursors from resolv.conf without the
	// loopback entry (which is ferry itself): asked through the DNAT rule
	// alone, a non-mesh name is answered by the recursor, not looped.
	if out := query(backend, "-server", "127.0.0.1:53", "ext.example.test", "A"); !strings.Contains(out, "198.18.77.77") {
		t.Errorf("default recursors: %s", out)
	}
	if want := `recursors=["` + recPod.IP.String() + `:53"]`; !strings.Contains(beFerry.Output(), want) {
		t.Errorf("backend's ferry: want %s in its log:\n%s", want, beFerry.Output())
	}

	// Garbage through the DNAT and straight at the listener.
	for _, addr := range []string{"127.0.0.1:53", "127.0.0.1:8600"} {
		if out, err := app.Exec(t, testbed.Proc{}, tool, "garbage", "-server", addr, "-n", "5000"); err != nil {
			t.Fatalf("garbage: %v\n%s", err, out)
		}
	}
	select {
	case <-appFerry.Done():
		t.Fatalf("ferry died:\n%s", appFerry.Output())
	default:
	}
	if got, err := resolve(t, "backend.default.svc.cluster.local"); got != vip {
		t.Errorf("after garbage: got %q (%v), want %s", got, err, vip)
	}
	if got, err := resolve(t, "ext.example.test", "RES_OPTIONS=use-vc"); got != "198.18.77.77" {
		t.Errorf("after garbage over TCP: got %q (%v)", got, err)
	}

	// The server's counters are in the sidecar's /metrics.
	t.Logf("app pod ferry /metrics: %s", strings.Join(dnsMetricLines(t, app, "ferry_dns_"), ", "))
	for _, m := range []struct {
		name string
		min  int64
	}{
		{"ferry_dns_queries_total", 30},
		{"ferry_dns_mesh_answers_total", 20},
		{"ferry_dns_upstream_exchanges_total", 3},
		{"ferry_dns_cache_hits_total", 1},
	} {
		if got := dnsMetricSum(t, app, m.name); got < m.min {
			t.Errorf("/metrics: %s = %d, want >= %d", m.name, got, m.min)
		}
	}
	for _, p := range []*testbed.Pod{app, backend} {
		if got := dnsMetricSum(t, p, "ferry_dns_loops_total"); got != 0 {
			t.Errorf("/metrics in %s: ferry_dns_loops_total = %d, want 0", p.Name, got)
		}
	}
}

// dnsSidecar installs the redirect rules with DNS redirection in p and
// starts ferry as UID 5995, as test/demo does.
func dnsSidecar(t *testing.T, p *testbed.Pod, ferry, proxyID string, args ...string) *testbed.Process {
	t.Helper()
	p.ExecOK(t, testbed.Proc{Name: "ferry redirect"}, ferry, "redirect",
		"-proxy-uid", "5995", "-proxy-id", proxyID, "-consul-dns-port", "8600")
	argv := append([]string{ferry, "run", "-proxy-id", proxyID}, args...)
	return p.Start(t, testbed.Proc{UID: 5995, Name: "ferry " + p.Name}, argv...)
}

// dnsAdmin GETs path from ferry's admin listener (127.0.0.1:19000) in p.
func dnsAdmin(t *testing.T, p *testbed.Pod, path string) string {
	t.Helper()
	out, _ := p.Exec(t, testbed.Proc{}, "bash", "-c",
		`exec 3<>/dev/tcp/127.0.0.1/19000 && printf 'GET `+path+` HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
	return out
}

func dnsWaitReady(t *testing.T, p *testbed.Pod, ferry *testbed.Process) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := dnsAdmin(t, p, "/ready")
		if strings.Contains(out, " 200 ") {
			return
		}
		select {
		case <-ferry.Done():
			t.Fatalf("ferry in %s exited:\n%s", p.Name, ferry.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("ferry in %s not ready: %s", p.Name, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dnsMetricSum adds up the samples of /metrics in p whose line starts with
// prefix (a family name, or a name and the first labels).
func dnsMetricSum(t *testing.T, p *testbed.Pod, prefix string) int64 {
	t.Helper()
	var sum int64
	for _, l := range strings.Split(dnsAdmin(t, p, "/metrics"), "\n") {
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		rest := l[len(prefix):]
		if !strings.HasPrefix(rest, " ") && !strings.HasPrefix(rest, "{") && !strings.HasPrefix(rest, ",") && !strings.HasPrefix(rest, "}") {
			continue // a longer name
		}
		f := strings.Fields(l)
		n, err := strconv.ParseInt(f[len(f)-1], 10, 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", l, err)
		}
		sum += n
	}
	return sum
}

// dnsMetricLines returns the samples of /metrics in p that start with prefix.
func dnsMetricLines(t *testing.T, p *testbed.Pod, prefix string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(dnsAdmin(t, p, "/metrics"), "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
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

// dnsBuildApp builds test/dnsapp (the stand-in recursor, a query tool and
// a garbage sender) into a directory any pod user can read.
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
	cmd := testbed.MustCommand(t, "go", "build", "-o", out, "./test/dnsapp")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build dnsapp: %v\n%s", err, b)
	}
	return out
}
