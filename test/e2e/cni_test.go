package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Issue 16 end to end: ferry-cni chained after the reference bridge plugin,
// run by the CNI project's cnitool against fresh network namespaces.

// TestCNIChain: ADD gives the pod its address and Consul's nat table (the
// oracle: `consul connect redirect-traffic` with the same config), CHECK
// passes, a second ADD changes nothing, DEL removes the rules, and DEL of a
// deleted namespace succeeds, for each CNI version the reference plugins
// speak.
func TestCNIChain(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	want, empty := cniOracle(t, tb)
	entry := map[string]any{"type": "ferry-cni", "name": "ferry-cni", "log_level": "debug"}

	for _, v := range []string{"1.0.0", "0.4.0"} {
		t.Run("cniVersion "+v, func(t *testing.T) {
			net := uniqueNet(tb, "v"+strings.ReplaceAll(v, ".", ""))
			e.writeConf(t, "10-"+net+".conflist", bridgeNet(tb, net, v, t.TempDir(), entry))
			pod := tb.AddBarePod(t, "cni"+strings.ReplaceAll(v, ".", ""))
			args := nomadArgs(consulRedirectJSON)

			e.runOK(t, "add", e.lo, pod.NSPath, "")
			res := e.runOK(t, "add", net, pod.NSPath, args)
			ip := cniResultIP(t, res)
			if !tb.Subnet.Contains(ip) {
				t.Fatalf("address %s outside the testbed subnet %s", ip, tb.Subnet)
			}
			if a := addrsOf(t, pod); !strings.Contains(a, ip.String()+"/24") {
				t.Fatalf("eth0 does not hold %s:\n%s", ip, a)
			}
			if got := natTable(t, pod, "iptables-save"); got != want {
				t.Fatalf("nat tables differ\n--- consul connect redirect-traffic\n%s\n--- ferry-cni\n%s", want, got)
			}
			e.runOK(t, "check", net, pod.NSPath, args)

			// A second ADD (a runtime retrying) with the same prevResult:
			// the same result, the same table.
			out, stderr, err := e.plugin(t, "ADD", pod.NSPath, args, pluginConf(t, v, entry, res))
			if err != nil {
				t.Fatalf("second ADD: %v\n%s\n%s", err, out, stderr)
			}
			if cniResultIP(t, out) != ip {
				t.Fatalf("second ADD changed the result:\n%s", out)
			}
			if !strings.Contains(stderr, "changed=false") {
				t.Fatalf("second ADD rewrote the rules:\n%s", stderr)
			}
			if got := natTable(t, pod, "iptables-save"); got != want {
				t.Fatalf("second ADD changed the table:\n%s", got)
			}

			// CHECK notices rules that went missing.
			pod.ExecOK(t, testbed.Proc{}, "iptables", "-t", "nat", "-D", "CONSUL_PROXY_OUTPUT", "-m", "owner", "--uid-owner", "5996", "-j", "RETURN")
			if out, err := e.run(t, "check", net, pod.NSPath, args); err == nil || !strings.Contains(out, "CONSUL_PROXY_OUTPUT") {
				t.Fatalf("CHECK passed with a rule missing: %v\n%s", err, out)
			}

			e.runOK(t, "del", net, pod.NSPath, args)
			if got := natTable(t, pod, "iptables-save"); got != empty {
				t.Fatalf("DEL left\n%s\nwant\n%s", got, empty)
			}
			if a := addrsOf(t, pod); a != "" {
				t.Fatalf("DEL left eth0:\n%s", a)
			}

			// DEL after the namespace is gone (a runtime cleaning up late).
			res = e.runOK(t, "add", net, pod.NSPath, args)
			if got := natTable(t, pod, "iptables-save"); got != want {
				t.Fatalf("ADD after DEL: nat table\n%s", got)
			}
			if out, err := exec.Command("ip", "netns", "del", pod.NS).CombinedOutput(); err != nil {
				t.Fatalf("ip netns del: %v\n%s", err, out)
			}
			e.runOK(t, "del", net, pod.NSPath, args)
			// And ferry-cni alone, with no namespace at all.
			if out, stderr, err := e.plugin(t, "DEL", "", args, pluginConf(t, v, entry, "")); err != nil {
				t.Fatalf("DEL without CNI_NETNS: %v\n%s\n%s", err, out, stderr)
			}
		})
	}
}

// TestCNIVersion110 runs ferry-cni alone (Debian's reference plugins stop
// at spec 1.0.0) in a 1.1.0 network through cnitool, whose libcni speaks
// 1.1.0: ADD installs the oracle's rules and returns an empty result,
// CHECK passes, STATUS and GC are supported, DEL removes the rules.
func TestCNIVersion110(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	want, empty := cniOracle(t, tb)
	net := uniqueNet(tb, "v110")
	e.writeConf(t, "10-"+net+".conflist", map[string]any{"cniVersion": "1.1.0", "name": net,
		"plugins": []any{map[string]any{"type": "ferry-cni", "name": "ferry-cni"}}})
	pod := tb.AddBarePod(t, "cni110")
	args := nomadArgs(consulRedirectJSON)
	out := e.runOK(t, "add", net, pod.NSPath, args)
	if !strings.Contains(out, `"cniVersion": "1.1.0"`) {
		t.Fatalf("result:\n%s", out)
	}
	if got := natTable(t, pod, "iptables-save"); got != want {
		t.Fatalf("nat tables differ\n--- consul connect redirect-traffic\n%s\n--- ferry-cni\n%s", want, got)
	}
	e.runOK(t, "check", net, pod.NSPath, args)
	e.runOK(t, "status", net, pod.NSPath, "")
	e.runOK(t, "gc", net, pod.NSPath, "")
	e.runOK(t, "del", net, pod.NSPath, args)
	if got := natTable(t, pod, "iptables-save"); got != empty {
		t.Fatalf("DEL left\n%s", got)
	}
}

// TestCNIDualStack gives the pod an IPv6 address too (a documentation
// prefix, routed nowhere): ferry-cni then installs IPv6 rules as well,
// exactly the tables `ferry redirect` installs with the same config in a
// pod the same chain set up without ferry-cni.
func TestCNIDualStack(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	// The two networks' host-local allocators are separate: each gets its
	// own IPv4 range and IPv6 /64, so the pods never share an address.
	dual := func(name string, n byte, extra ...map[string]any) map[string]any {
		c := bridgeNet(tb, name, "1.0.0", t.TempDir(), extra...)
		ipam := c["plugins"].([]any)[0].(map[string]any)["ipam"].(map[string]any)
		v4 := ipam["ranges"].([]any)[0].([]any)[0].(map[string]any)
		a := tb.Subnet.Addr().As4()
		a[3] = 100 + 10*n
		v4["rangeStart"], v4["rangeEnd"] = netip.AddrFrom4(a).String(), netip.AddrFrom4(a).Next().String()
		ipam["ranges"] = append(ipam["ranges"].([]any), []any{map[string]any{"subnet": fmt.Sprintf("2001:db8:f%s:%d::/64", tb.Name[:3], n)}})
		return c
	}
	withCNI, without := uniqueNet(tb, "ds"), uniqueNet(tb, "ds-plain")
	e.writeConf(t, "10-"+withCNI+".conflist", dual(withCNI, 1, map[string]any{"type": "ferry-cni", "name": "ferry-cni"}))
	e.writeConf(t, "11-"+without+".conflist", dual(without, 2))
	cfg := `{"ProxyUserID":"5995","ProxyInboundPort":20000,"ConsulDNSPort":8600,"ExcludeOutboundCIDRs":["203.0.113.0/24","2001:db8::/32"],"ExcludeUIDs":["5996"]}`

	pc := tb.AddBarePod(t, "ds-cni")
	e.runOK(t, "add", withCNI, pc.NSPath, nomadArgs(cfg))
	t.Cleanup(func() { e.run(t, "del", withCNI, pc.NSPath, nomadArgs(cfg)) })
	pr := tb.AddBarePod(t, "ds-redirect")
	e.runOK(t, "add", without, pr.NSPath, "")
	t.Cleanup(func() { e.run(t, "del", without, pr.NSPath, "") })
	out := pr.ExecOK(t, testbed.Proc{Env: []string{"CONSUL_REDIRECT_TRAFFIC_CONFIG=" + cfg}}, e.ferry, "redirect")
	if !strings.Contains(out, "IPv6 traffic redirection rules installed") {
		t.Fatalf("ferry redirect did not see the IPv6 address:\n%s", out)
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		want, got := natTable(t, pr, save), natTable(t, pc, save)
		if got != want {
			t.Fatalf("%s differs\n--- ferry redirect\n%s\n--- ferry-cni\n%s", save, want, got)
		}
		if !strings.Contains(got, "CONSUL_PROXY_OUTPUT") {
			t.Fatalf("%s has no rules:\n%s", save, got)
		}
	}
	if v6 := natTable(t, pc, "ip6tables-save"); !strings.Contains(v6, "-d 2001:db8::/32 -j RETURN") || strings.Contains(v6, "203.0.113") {
		t.Fatalf("IPv6 table:\n%s", v6)
	}
}

// TestCNINomadAsConsulCNI replaces consul-cni the way Nomad needs it:
// Nomad's bridge network config names the plugin type consul-cni (with
// only log_level), so the ferry binary is installed under that name. The
// chain mirrors Nomad's: bridge, then consul-cni, CONSUL_IPTABLES_CONFIG in
// CNI_ARGS.
func TestCNINomadAsConsulCNI(t *testing.T) {
	e := newCNIEnv(t)
	if err := os.Symlink(e.ferry, filepath.Join(e.binDir, "consul-cni")); err != nil {
		t.Fatal(err)
	}
	tb := testbed.New(t)
	want, empty := cniOracle(t, tb)
	net := uniqueNet(tb, "nomad")
	e.writeConf(t, "10-"+net+".conflist", bridgeNet(tb, net, "1.0.0", t.TempDir(), map[string]any{"type": "consul-cni", "log_level": "debug"}))
	pod := tb.AddBarePod(t, "nomad")
	args := nomadArgs(consulRedirectJSON)
	e.runOK(t, "add", e.lo, pod.NSPath, "")
	cniResultIP(t, e.runOK(t, "add", net, pod.NSPath, args))
	if got := natTable(t, pod, "iptables-save"); got != want {
		t.Fatalf("nat tables differ\n--- consul connect redirect-traffic\n%s\n--- ferry as consul-cni\n%s", want, got)
	}
	e.runOK(t, "check", net, pod.NSPath, args)
	e.runOK(t, "del", net, pod.NSPath, args)
	if got := natTable(t, pod, "iptables-save"); got != empty {
		t.Fatalf("DEL left\n%s", got)
	}
	// An allocation without transparent proxy: no CONSUL_IPTABLES_CONFIG.
	pod2 := tb.AddBarePod(t, "nomad-plain")
	cniResultIP(t, e.runOK(t, "add", net, pod2.NSPath, "IgnoreUnknown=true"))
	if got := natTable(t, pod2, "iptables-save"); got != empty {
		t.Fatalf("rules without a config:\n%s", got)
	}
	e.runOK(t, "del", net, pod2.NSPath, "IgnoreUnknown=true")
}

// TestCNIBadInput runs ferry-cni, as the runtime runs it after the bridge
// plugin, with bad inputs: each must give a CNI error result (code, msg,
// details naming the input) on stdout and a non-zero exit, install no rule,
// and leave the interface the bridge plugin configured as it was. A
// namespace that is the node's own is refused before anything is touched.
func TestCNIBadInput(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	net := uniqueNet(tb, "bad")
	e.writeConf(t, "10-"+net+".conflist", bridgeNet(tb, net, "1.0.0", t.TempDir()))
	pod := tb.AddBarePod(t, "cnibad")
	e.runOK(t, "add", e.lo, pod.NSPath, "")
	prev := e.runOK(t, "add", net, pod.NSPath, "")
	t.Cleanup(func() { e.run(t, "del", net, pod.NSPath, "") })
	entry := map[string]any{"type": "ferry-cni", "name": "ferry-cni"}
	good := pluginConf(t, "1.0.0", entry, prev)
	addrs, nat, nat6 := addrsOf(t, pod), natTable(t, pod, "iptables-save"), natTable(t, pod, "ip6tables-save")
	hostConsul := hostConsulRules(t)

	cfg := func(s string) string { return nomadArgs(s) }
	cases := []struct {
		name, netns, args string
		stdin             []byte
		code              uint
		want              string // in msg or details
	}{
		{"malformed network config", pod.NSPath, cfg(consulRedirectJSON), []byte(`{"cniVersion":"1.0.0","name":"x","type":"ferry-cni",`), 6, "unmarshal"},
		{"unknown CNI version", pod.NSPath, cfg(consulRedirectJSON), pluginConf(t, "9.9.9", entry, ""), 1, "incompatible"},
		{"missing netns", "/var/run/netns/ferry-no-such-ns", cfg(consulRedirectJSON), good, 8, "ferry-no-such-ns"},
		{"netns is the node's own", fmt.Sprintf("/proc/%d/ns/net", os.Getpid()), cfg(consulRedirectJSON), good, 8, "own"},
		{"malformed CONSUL_IPTABLES_CONFIG", pod.NSPath, cfg(`{"ProxyUserID":"5995","ProxyInboundPort":`), good, 6, "CNI_ARGS CONSUL_IPTABLES_CONFIG"},
		{"wrong JSON type", pod.NSPath, cfg(`{"ProxyUserID":5995,"ProxyInboundPort":20000}`), good, 6, "ProxyUserID"},
		{"unknown field", pod.NSPath, cfg(`{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeUID":["1"]}`), good, 7, "ExcludeUID"},
		{"octal port", pod.NSPath, cfg(`{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeInboundPorts":["0443"]}`), good, 7,
			`CNI_ARGS CONSUL_IPTABLES_CONFIG field ExcludeInboundPorts "0443"`},
		{"no proxy UID", pod.NSPath, cfg(`{"ProxyInboundPort":20000}`), good, 7, "ProxyUserID"},
		{"IPv6 DNS in an IPv4 pod", pod.NSPath, cfg(`{"ProxyUserID":"5995","ProxyInboundPort":20000,"ConsulDNSIP":"::1","ConsulDNSPort":8600}`), good, 7, "IPv6"},
		{"bad CNI_ARGS", pod.NSPath, "CONSUL_IPTABLES_CONFIG", good, 4, "CNI_ARGS"},
		{"k8s pod without a kubeconfig", pod.NSPath, "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", good, 7, "kubeconfig"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, stderr, err := e.plugin(t, "ADD", c.netns, c.args, c.stdin)
			if err == nil {
				t.Fatalf("ADD succeeded:\n%s", out)
			}
			ce := decodeCNIError(t, out)
			t.Logf("code %d msg %q details %q", ce.Code, ce.Msg, ce.Details)
			if ce.Code != c.code {
				t.Errorf("code %d, want %d", ce.Code, c.code)
			}
			if !strings.Contains(ce.Msg+" "+ce.Details, c.want) {
				t.Errorf("error does not name %q: %+v\n%s", c.want, ce, stderr)
			}
			if got := natTable(t, pod, "iptables-save"); got != nat {
				t.Fatalf("nat table changed:\n%s", got)
			}
			if got := natTable(t, pod, "ip6tables-save"); got != nat6 {
				t.Fatalf("IPv6 nat table changed:\n%s", got)
			}
			if got := addrsOf(t, pod); got != addrs {
				t.Fatalf("eth0 changed:\n%s\nwas\n%s", got, addrs)
			}
		})
	}
	if got := hostConsulRules(t); got != hostConsul {
		t.Fatalf("the node's nat table changed:\n%s\nwas\n%s", got, hostConsul)
	}
	// CHECK of a pod whose rules were never installed fails, naming a chain.
	out, _, err := e.plugin(t, "CHECK", pod.NSPath, cfg(consulRedirectJSON), good)
	if ce := decodeCNIError(t, out); err == nil || !strings.Contains(ce.Details, "CONSUL_") {
		t.Fatalf("CHECK without rules: %v %+v", err, ce)
	}
}

// TestCNIMesh: a pod whose network and redirect rules come only from the
// CNI chain (no ferry redirect, no NET_ADMIN anywhere in the pod) runs a
// ferry sidecar, and its app's plain connection to a service's virtual IP
// is carried by that sidecar over mTLS to a meshed backend.
func TestCNIMesh(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	backend := tb.AddPod(t, "cni-back")
	br := tb.Register(t, testbed.Service{Name: "backend", Pod: backend, Port: 8080})
	backendApp := meshEchoServer(t, backend, "backend app", ":8080")
	meshSidecar(t, backend, br.ProxyID)

	net := uniqueNet(tb, "mesh")
	e.writeConf(t, "10-"+net+".conflist", bridgeNet(tb, net, "1.0.0", t.TempDir(), map[string]any{"type": "ferry-cni", "name": "ferry-cni"}))
	front := tb.AddBarePod(t, "cni-front")
	args := nomadArgs(`{"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001}`)
	e.runOK(t, "add", e.lo, front.NSPath, "")
	front.IP = cniResultIP(t, e.runOK(t, "add", net, front.NSPath, args))
	t.Cleanup(func() { e.run(t, "del", net, front.NSPath, args) })
	fr := tb.Register(t, testbed.Service{Name: "frontend", Pod: front, Port: 8080})
	cniStartFerry(t, front, fr.ProxyID)

	vip := meshVIP(t, tb, "backend") + ":8080"
	sent := meshMetric(t, front, `ferry_sent_bytes_total{direction="outbound"}`)
	accepts := meshAccepts(backendApp)
	const n = 256 << 10
	out, err := meshEchoClient(t, front, vip, n, 1)
	if err != nil || !strings.Contains(out, "ok conns=1") {
		t.Fatalf("echo client in the CNI pod -> %s: %v\n%s", vip, err, out)
	}
	if got := meshAcceptsAtLeast(t, backendApp, accepts+1); got != accepts+1 {
		t.Fatalf("backend app accepted %d connections, want %d", got, accepts+1)
	}
	meshPoll(t, "the CNI pod's ferry counting the bytes", 5*time.Second, func() bool {
		return meshMetric(t, front, `ferry_sent_bytes_total{direction="outbound"}`)-sent >= n
	})
}
