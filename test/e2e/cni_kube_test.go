package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestCNIKubeAnnotation is the consul-k8s path end to end: `ferry cni
// install` turns the node's bridge .conf into a [bridge, ferry-cni]
// .conflist and writes a kubeconfig for a real kube-apiserver; the runtime
// (cnitool) then passes only the pod's identity in CNI_ARGS, and ferry-cni
// reads the pod's redirect-traffic-config annotation through the API.
// `ferry cni uninstall` leaves the CNI dirs byte-identical to the start.
func TestCNIKubeAnnotation(t *testing.T) {
	e := newCNIEnv(t)
	tb := testbed.New(t)
	want, empty := cniOracle(t, tb)
	k := testbed.StartKube(t)

	const ns = "apps"
	k.CreatePod(t, ns, "meshed", map[string]string{
		"consul.hashicorp.com/connect-inject-status":    "injected",
		"consul.hashicorp.com/transparent-proxy-status": "enabled",
		"consul.hashicorp.com/redirect-traffic-config":  consulRedirectJSON,
		"consul.hashicorp.com/dual-stack":               "false",
	})
	k.CreatePod(t, ns, "plain", nil)
	k.CreatePod(t, ns, "broken", map[string]string{"consul.hashicorp.com/redirect-traffic-config": `{"ProxyUserID":"5995",`})

	// The node: a single bridge .conf, as a network plugin leaves it.
	net := uniqueNet(tb, "k8s")
	bridge := bridgeNet(tb, net, "1.0.0", t.TempDir())["plugins"].([]any)[0].(map[string]any)
	bridge["cniVersion"], bridge["name"] = "1.0.0", net
	e.writeConf(t, "10-"+net+".conf", bridge)
	if err := os.Remove(filepath.Join(e.binDir, "ferry-cni")); err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(k.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	netBefore, binBefore := dirBytes(t, e.netDir), dirBytes(t, e.binDir)
	install := testbed.MustCommand(t, e.ferry, "cni", "install", "-cni-bin-dir", e.binDir, "-cni-net-dir", e.netDir,
		"-api-server", k.Server, "-ca-file", k.CAFile, "-token-file", tokenFile, "-log-level", "debug")
	if out, err := install.CombinedOutput(); err != nil || !strings.Contains(string(out), "installed in") {
		t.Fatalf("ferry cni install: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(e.netDir, "10-"+net+".conflist")); err != nil {
		t.Fatalf("no conflist after install: %v", err)
	}

	podArgs := func(name string) string {
		return "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=" + name + ";K8S_POD_INFRA_CONTAINER_ID=sandbox-" + name
	}
	t.Run("annotated pod gets Consul's rules", func(t *testing.T) {
		pod := tb.AddBarePod(t, "k8s-meshed")
		e.runOK(t, "add", e.lo, pod.NSPath, "")
		res := e.runOK(t, "add", net, pod.NSPath, podArgs("meshed"))
		if a := addrsOf(t, pod); !strings.Contains(a, cniResultIP(t, res).String()) {
			t.Fatalf("eth0: %s", a)
		}
		if got := natTable(t, pod, "iptables-save"); got != want {
			t.Fatalf("nat tables differ\n--- consul connect redirect-traffic\n%s\n--- ferry-cni\n%s", want, got)
		}
		e.runOK(t, "check", net, pod.NSPath, podArgs("meshed"))
		e.runOK(t, "del", net, pod.NSPath, podArgs("meshed"))
		if got := natTable(t, pod, "iptables-save"); got != empty {
			t.Fatalf("DEL left\n%s", got)
		}
	})
	t.Run("pod without the annotation is left alone", func(t *testing.T) {
		pod := tb.AddBarePod(t, "k8s-plain")
		res := e.runOK(t, "add", net, pod.NSPath, podArgs("plain"))
		cniResultIP(t, res)
		if got := natTable(t, pod, "iptables-save"); got != empty {
			t.Fatalf("rules in an unannotated pod:\n%s", got)
		}
		e.runOK(t, "check", net, pod.NSPath, podArgs("plain"))
		e.runOK(t, "del", net, pod.NSPath, podArgs("plain"))
	})
	for _, c := range []struct{ name, pod, want string }{
		{"malformed annotation", "broken", "annotation consul.hashicorp.com/redirect-traffic-config"},
		{"pod unknown to the API server", "ghost", "not found"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pod := tb.AddBarePod(t, "k8s-"+c.pod)
			out, err := e.run(t, "add", net, pod.NSPath, podArgs(c.pod))
			t.Cleanup(func() { e.run(t, "del", net, pod.NSPath, podArgs(c.pod)) })
			if err == nil || !strings.Contains(out, c.want) {
				t.Fatalf("ADD: %v, want an error naming %q:\n%s", err, c.want, out)
			}
			t.Logf("%s", strings.TrimSpace(out))
			if got := natTable(t, pod, "iptables-save"); got != empty {
				t.Fatalf("rules left behind:\n%s", got)
			}
		})
	}

	t.Run("the DaemonSet manifest passes the API server's strict validation", func(t *testing.T) {
		root, err := testbed.RepoRoot()
		if err != nil {
			t.Fatal(err)
		}
		k.MustDo(t, "POST", "/api/v1/namespaces", map[string]any{"apiVersion": "v1", "kind": "Namespace",
			"metadata": map[string]any{"name": "consul"}}, 201)
		k.DryRunManifest(t, filepath.Join(root, "deploy", "ferry-cni.yaml"), map[string]string{
			"v1/ServiceAccount":                               "/api/v1/namespaces/consul/serviceaccounts",
			"rbac.authorization.k8s.io/v1/ClusterRole":        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
			"rbac.authorization.k8s.io/v1/ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
			"apps/v1/DaemonSet":                               "/apis/apps/v1/namespaces/consul/daemonsets",
		})
	})

	uninstall := testbed.MustCommand(t, e.ferry, "cni", "uninstall", "-cni-bin-dir", e.binDir, "-cni-net-dir", e.netDir)
	if out, err := uninstall.CombinedOutput(); err != nil {
		t.Fatalf("ferry cni uninstall: %v\n%s", err, out)
	}
	if got := dirBytes(t, e.netDir); got != netBefore {
		t.Fatalf("net dir after uninstall:\n%s\nwant\n%s", got, netBefore)
	}
	if got := dirBytes(t, e.binDir); got != binBefore {
		t.Fatalf("bin dir after uninstall:\n%s\nwant\n%s", got, binBefore)
	}
}
