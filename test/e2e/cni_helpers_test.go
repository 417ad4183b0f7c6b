package e2e

import (
	"bytes"
	"encoding/json"
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

// Helpers for the CNI tests: the reference plugins from Debian's
// containernetworking-plugins, the CNI project's cnitool, and ferry-cni (the
// ferry binary under that name) in a plugin dir of the test's own.

// cniRefDir is where Debian's containernetworking-plugins puts the
// reference plugins.
const cniRefDir = "/usr/lib/cni"

// requireProgram returns path if it is an executable file, and otherwise
// fails t naming the Debian package that provides it (test/scripts/deps.sh
// installs it).
func requireProgram(t *testing.T, path, pkg string) string {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		t.Fatalf("%s is missing: install the Debian package %s (make deps, or test/scripts/deps.sh)", path, pkg)
	}
	return path
}

// cniEnv runs CNI operations the way a container runtime does.
type cniEnv struct {
	tool   string // cnitool
	ferry  string // the ferry binary
	binDir string // holds ferry-cni (a symlink to ferry)
	netDir string // NETCONFPATH
	path   string // CNI_PATH
	lo     string // the loopback network's name
}

func newCNIEnv(t *testing.T) *cniEnv {
	t.Helper()
	testbed.RequireRoot(t)
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		requireProgram(t, filepath.Join(cniRefDir, p), "containernetworking-plugins")
	}
	e := &cniEnv{
		tool:   testbed.CNIToolBinary(t),
		ferry:  testbed.FerryBinary(t),
		binDir: t.TempDir(),
		netDir: t.TempDir(),
	}
	// The runtime finds a plugin by its type in CNI_PATH; argv[0]'s base
	// name ferry-cni selects the plugin in the ferry binary.
	if err := os.Symlink(e.ferry, filepath.Join(e.binDir, "ferry-cni")); err != nil {
		t.Fatal(err)
	}
	e.path = e.binDir + ":" + cniRefDir
	// Every pod gets lo up from the loopback plugin, as its own network,
	// which is how containerd and CRI-O run it.
	e.lo = "ferry-lo-" + filepath.Base(e.netDir)
	e.writeConf(t, "99-lo.conflist", map[string]any{
		"cniVersion": "1.0.0", "name": e.lo, "plugins": []any{map[string]any{"type": "loopback"}}})
	return e
}

// writeConf writes a network config into the test's config dir. libcni
// caches each attachment's result under /var/lib/cni/results, named after
// the network; cleanup removes this test's entries (a failed test may not
// have reached its DEL).
func (e *cniEnv) writeConf(t *testing.T, name string, conf map[string]any) {
	t.Helper()
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.netDir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if net, _ := conf["name"].(string); net != "" {
		t.Cleanup(func() {
			stale, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", net+"-*"))
			for _, f := range stale {
				os.Remove(f)
			}
		})
	}
}

// bridgeNet is a [bridge(host-local), extra...] network on the testbed's
// bridge and subnet, with addresses from .200 up (AddPod uses .2 up) and a
// route for Consul's virtual IPs (240.0.0.0/4) via the bridge, so a pod's
// app can dial one and meet its redirect rules.
func bridgeNet(tb *testbed.Testbed, name, cniVersion, ipamDir string, extra ...map[string]any) map[string]any {
	a := tb.Subnet.Addr().As4()
	lo, hi := a, a
	lo[3], hi[3] = 200, 250
	plugins := []any{map[string]any{
		"type": "bridge", "bridge": tb.BridgeName(), "isGateway": false, "ipMasq": false,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": ipamDir,
			"ranges": []any{[]any{map[string]any{
				"subnet": tb.Subnet.String(), "rangeStart": netip.AddrFrom4(lo).String(),
				"rangeEnd": netip.AddrFrom4(hi).String(), "gateway": tb.Gateway.String()}}},
			"routes": []any{map[string]any{"dst": "240.0.0.0/4", "gw": tb.Gateway.String()}},
		},
	}}
	for _, x := range extra {
		plugins = append(plugins, x)
	}
	return map[string]any{"cniVersion": cniVersion, "name": name, "plugins": plugins}
}

// run runs `cnitool cmd net netns` with CNI_ARGS args.
func (e *cniEnv) run(t *testing.T, cmd, net, netns, args string) (string, error) {
	t.Helper()
	c := exec.Command(e.tool, cmd, net, netns)
	c.Env = append(os.Environ(), "NETCONFPATH="+e.netDir, "CNI_PATH="+e.path, "CNI_ARGS="+args, "CNI_IFNAME=eth0")
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	err := c.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

func (e *cniEnv) runOK(t *testing.T, cmd, net, netns, args string) string {
	t.Helper()
	out, err := e.run(t, cmd, net, netns, args)
	if err != nil {
		t.Fatalf("cnitool %s %s %s: %v\n%s", cmd, net, netns, err, out)
	}
	return out
}

// plugin runs ferry-cni directly, as the runtime runs each plugin of a
// chain: CNI_* environment, the network config (with prevResult) on stdin.
// It returns stdout (the result or the CNI error) and the exit error.
func (e *cniEnv) plugin(t *testing.T, cmd, netns, args string, stdin []byte) (string, string, error) {
	t.Helper()
	c := exec.Command(filepath.Join(e.binDir, "ferry-cni"))
	c.Env = append(os.Environ(), "CNI_COMMAND="+cmd, "CNI_CONTAINERID=ferry-e2e", "CNI_NETNS="+netns,
		"CNI_IFNAME=eth0", "CNI_PATH="+e.path, "CNI_ARGS="+args)
	c.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	err := c.Run()
	return out.String(), errb.String(), err
}

// pluginConf is ferry-cni's stdin when chained: its own entry plus the
// network's name and version and the previous plugin's result.
func pluginConf(t *testing.T, cniVersion string, entry map[string]any, prevResult string) []byte {
	t.Helper()
	c := map[string]any{"cniVersion": cniVersion, "name": "ferry-e2e"}
	for k, v := range entry {
		c[k] = v
	}
	if prevResult != "" {
		c["prevResult"] = json.RawMessage(prevResult)
	}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cniResultIP returns the first address of a CNI result (0.4.0 and 1.0.0
// share the "ips" list).
func cniResultIP(t *testing.T, result string) netip.Addr {
	t.Helper()
	var r struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal([]byte(result), &r); err != nil || len(r.IPs) == 0 {
		t.Fatalf("CNI result without an address (%v):\n%s", err, result)
	}
	p, err := netip.ParsePrefix(r.IPs[0].Address)
	if err != nil {
		t.Fatal(err)
	}
	return p.Addr()
}

// cniError decodes a CNI error result.
type cniErr struct {
	Code    uint   `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details"`
}

func decodeCNIError(t *testing.T, stdout string) cniErr {
	t.Helper()
	var e cniErr
	if err := json.Unmarshal([]byte(stdout), &e); err != nil || e.Code == 0 || e.Msg == "" {
		t.Fatalf("stdout is not a CNI error result (%v):\n%s", err, stdout)
	}
	return e
}

// addrsOf is `ip -o addr show dev eth0` in the pod, or "" without eth0.
func addrsOf(t *testing.T, p *testbed.Pod) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", p.NS, "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil {
		return ""
	}
	return string(out)
}

// consulRedirectJSON is Consul's iptables.Config JSON (what Nomad puts in
// CONSUL_IPTABLES_CONFIG and consul-k8s in the redirect-traffic-config
// annotation) for the same rules as cniOracleFlags.
const consulRedirectJSON = `{"ConsulDNSIP":"127.0.0.1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,` +
	`"ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200","21000"],"ExcludeOutboundPorts":["8080"],` +
	`"ExcludeOutboundCIDRs":["203.0.113.0/24","169.254.169.254/32"],"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`

var cniOracleFlags = []string{"-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-proxy-outbound-port", "15001",
	"-consul-dns-ip", "127.0.0.1", "-consul-dns-port", "8600",
	"-exclude-inbound-port", "20200", "-exclude-inbound-port", "21000", "-exclude-outbound-port", "8080",
	"-exclude-outbound-cidr", "203.0.113.0/24", "-exclude-outbound-cidr", "169.254.169.254/32", "-exclude-uid", "5996"}

// cniOracle runs `consul connect redirect-traffic` with cniOracleFlags in a
// fresh pod and returns its nat table, and the table of a pod without rules.
func cniOracle(t *testing.T, tb *testbed.Testbed) (rules, empty string) {
	t.Helper()
	p := tb.AddPod(t, "cni-oracle")
	empty = natTable(t, p, "iptables-save")
	out, err := p.Exec(t, testbed.Proc{}, append([]string{testbed.ConsulBinary(t), "connect", "redirect-traffic"}, cniOracleFlags...)...)
	if err != nil {
		t.Fatalf("consul connect redirect-traffic: %v\n%s", err, out)
	}
	rules = natTable(t, p, "iptables-save")
	if !strings.Contains(rules, "--uid-owner 5996") || !strings.Contains(rules, "203.0.113.0/24") {
		t.Fatalf("oracle table lacks the exclusions:\n%s", rules)
	}
	return rules, empty
}

func nomadArgs(cfg string) string {
	return "IgnoreUnknown=true;CONSUL_IPTABLES_CONFIG=" + cfg
}

func uniqueNet(tb *testbed.Testbed, what string) string {
	return fmt.Sprintf("ferry-%s-%s", tb.Name, what)
}

// hostConsulRules is the node's own nat table, only its CONSUL_ lines: other
// tests running in parallel may change the rest.
func hostConsulRules(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("iptables-save", "-t", "nat").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-save on the node: %v\n%s", err, out)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "CONSUL_") {
			keep = append(keep, counters.ReplaceAllString(l, ""))
		}
	}
	return strings.Join(keep, "\n")
}

// cniStartFerry starts `ferry run` for proxyID in pod as the proxy UID and
// waits for /ready: meshSidecar without its `ferry redirect` step, since in
// a CNI pod the plugin has installed the rules already.
func cniStartFerry(t *testing.T, pod *testbed.Pod, proxyID string) *testbed.Process {
	t.Helper()
	pr := pod.Start(t, testbed.Proc{UID: meshProxyUID, Name: "ferry run " + pod.Name}, testbed.FerryBinary(t), "run", "-proxy-id", proxyID)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _ := meshAdminGet(t, pod, "/ready"); code == 200 {
			return pr
		}
		select {
		case <-pr.Done():
			t.Fatalf("ferry in %s exited before ready:\n%s", pod.Name, pr.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("ferry in %s not ready after 30s:\n%s", pod.Name, pr.Output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
