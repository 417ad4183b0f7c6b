package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestInjectInitContainerInstallsConsulRules: the init container `ferry
// inject` writes for a pod with every exclusion annotation, metrics and the
// proxy health check, run as written (its command and environment), installs
// exactly the nat table `consul connect redirect-traffic` installs from the
// same settings.
func TestInjectInitContainerInstallsConsulRules(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	ferry := testbed.FerryBinary(t)

	src, err := os.ReadFile(filepath.Join("..", "..", "inject", "testdata", "golden", "exclusions.in.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := testbed.MustCommand(t, ferry, "inject", "-quiet", "-cluster-dns", "10.96.0.10")
	cmd.Stdin = bytes.NewReader(src)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ferry inject: %v\n%s", err, stderr.String())
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(out, &pod); err != nil {
		t.Fatal(err)
	}
	var init *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == "consul-connect-inject-init" {
			init = &pod.Spec.InitContainers[i]
		}
	}
	if init == nil || len(init.Command) != 2 || init.Command[0] != "/usr/local/bin/ferry" || init.Command[1] != "redirect" {
		t.Fatalf("init container: %+v", init)
	}
	var env []string
	var cfg struct {
		ConsulDNSIP                                                                  string
		ConsulDNSPort, ProxyInboundPort, ProxyOutboundPort                           int
		ProxyUserID                                                                  string
		ExcludeInboundPorts, ExcludeOutboundPorts, ExcludeOutboundCIDRs, ExcludeUIDs []string
	}
	for _, e := range init.Env {
		env = append(env, e.Name+"="+e.Value)
		if e.Name == "CONSUL_REDIRECT_TRAFFIC_CONFIG" {
			if err := json.Unmarshal([]byte(e.Value), &cfg); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(cfg.ExcludeInboundPorts) != 5 || len(cfg.ExcludeUIDs) != 3 {
		t.Fatalf("unexpected redirect config %+v", cfg)
	}

	oracle := tb.AddPod(t, "inject-oracle")
	flags := []string{testbed.ConsulBinary(t), "connect", "redirect-traffic",
		"-proxy-uid", cfg.ProxyUserID, "-proxy-inbound-port", strconv.Itoa(cfg.ProxyInboundPort),
		"-proxy-outbound-port", strconv.Itoa(cfg.ProxyOutboundPort),
		"-consul-dns-ip", cfg.ConsulDNSIP, "-consul-dns-port", strconv.Itoa(cfg.ConsulDNSPort)}
	add := func(flag string, vs []string) {
		for _, v := range vs {
			flags = append(flags, flag, v)
		}
	}
	add("-exclude-inbound-port", cfg.ExcludeInboundPorts)
	add("-exclude-outbound-port", cfg.ExcludeOutboundPorts)
	add("-exclude-outbound-cidr", cfg.ExcludeOutboundCIDRs)
	add("-exclude-uid", cfg.ExcludeUIDs)
	if out, err := oracle.Exec(t, testbed.Proc{}, flags...); err != nil {
		t.Fatalf("consul connect redirect-traffic: %v\n%s", err, out)
	}
	want := natTable(t, oracle, "iptables-save")
	for _, rule := range []string{"--dport 9000:9100 -j RETURN", "-d 169.254.169.254/32 -j RETURN", "--uid-owner 4321 -j RETURN", "--dport 21000 -j RETURN", "127.0.0.1:8600"} {
		if !strings.Contains(want, rule) {
			t.Fatalf("oracle table lacks %q:\n%s", rule, want)
		}
	}

	meshed := tb.AddPod(t, "inject-init")
	meshed.ExecOK(t, testbed.Proc{Env: env, Name: "init container"}, ferry, "redirect")
	if got := natTable(t, meshed, "iptables-save"); got != want {
		t.Fatalf("nat tables differ\n--- consul connect redirect-traffic\n%s\n--- the injected init container\n%s", want, got)
	}
}
