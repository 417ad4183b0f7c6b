package e2e

import (
	"os/exec"
	"strings"
	"testing"

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

			e.runOK(t, "add", "lo", pod.NSPath, "")
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
