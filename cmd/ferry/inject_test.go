package main

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/inject"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

func runInjectForTest(t *testing.T, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := runInject(args, strings.NewReader(stdin), &out, &errb)
	code = exitCode(err, &errb)
	return out.String(), errb.String(), code
}

// TestInjectCommandMatchesGolden: the command's defaults and -cluster-dns
// give the library's reviewed output, from stdin and from a file alike.
func TestInjectCommandMatchesGolden(t *testing.T) {
	in, err := os.ReadFile("../../inject/testdata/golden/deployment-probes.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	golden, err := os.ReadFile("../../inject/testdata/golden/deployment-probes.golden.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	for _, line := range strings.SplitAfter(string(golden), "\n") {
		if !strings.HasPrefix(line, "# Deployment ") {
			want.WriteString(line)
		}
	}
	for _, args := range [][]string{{"-cluster-dns", "10.96.0.10"}, {"-cluster-dns", "10.96.0.10", "../../inject/testdata/golden/deployment-probes.in.yaml"}} {
		out, errs, code := runInjectForTest(t, string(in), args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errs)
		}
		if out != want.String() {
			t.Errorf("%v: output differs from the golden file:\n%s", args, out)
		}
		if errs != "ferry inject: Deployment shop/web: injected\n" {
			t.Errorf("%v: stderr %q", args, errs)
		}
	}
}

func TestInjectCommandErrors(t *testing.T) {
	pod := "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {consul.hashicorp.com/connect-inject: \"true\"}}\nspec: {containers: [{name: a, image: a}]}\n"
	cases := []struct {
		name  string
		stdin string
		args  []string
		code  int
		want  string
	}{
		{"no cluster DNS", pod, nil, 1, "-cluster-dns"},
		{"bad cluster DNS", pod, []string{"-cluster-dns", "kube-dns"}, 2, "not an IP address"},
		{"refused pod", strings.Replace(pod, "image: a}", "image: a, securityContext: {runAsUser: 5995}}", 1), []string{"-cluster-dns", "10.0.0.10"}, 1, "runAsUser 5995"},
		{"not YAML", "{", []string{"-cluster-dns", "10.0.0.10"}, 1, "document 1"},
		{"webhook without certificate", "", []string{"-webhook"}, 2, "-tls-cert-file"},
		{"webhook outside a cluster", "", []string{"-webhook", "-tls-cert-file", "c", "-tls-key-file", "k"}, 2, "-kube-server"},
		{"bad namespace label", pod, []string{"-cluster-dns", "10.0.0.10", "-namespace-label", "x"}, 2, "key=value"},
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	for _, c := range cases {
		out, errs, code := runInjectForTest(t, c.stdin, c.args...)
		if code != c.code || !strings.Contains(errs, c.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d mentioning %q", c.name, code, errs, c.code, c.want)
		}
		if code != 0 && out != "" {
			t.Errorf("%s: wrote output although it failed: %q", c.name, out)
		}
	}
}

// TestInjectNamespaceLabel: -namespace-label stands for the namespace's
// labels, here turning transparent proxy off.
func TestInjectNamespaceLabel(t *testing.T) {
	pod := "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {consul.hashicorp.com/connect-inject: \"true\"}}\nspec: {containers: [{name: a, image: a}]}\n"
	out, errs, code := runInjectForTest(t, pod, "-namespace-label", "consul.hashicorp.com/transparent-proxy=false")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if strings.Contains(out, "consul-connect-inject-init") || !strings.Contains(out, "name: consul-dataplane") {
		t.Errorf("output:\n%s", out)
	}
}

// TestInjectDeployManifestFlags: the webhook Deployment in
// deploy/ferry-inject.yaml passes flags ferry inject knows.
func TestInjectDeployManifestFlags(t *testing.T) {
	b, err := os.ReadFile("../../deploy/ferry-inject.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var command []string
	for _, doc := range strings.Split(string(b), "\n---\n") {
		if !strings.Contains(doc, "kind: Deployment") {
			continue
		}
		var d appsv1.Deployment
		if err := yaml.UnmarshalStrict([]byte(doc), &d); err != nil {
			t.Fatal(err)
		}
		command = d.Spec.Template.Spec.Containers[0].Command
	}
	if len(command) < 3 || command[0] != "/ferry" || command[1] != "inject" {
		t.Fatalf("command %q", command)
	}
	var f injectFlags
	fs := newInjectFlagSet(&f, io.Discard)
	if err := fs.Parse(command[2:]); err != nil || fs.NArg() != 0 || !f.webhook {
		t.Fatalf("parse %q: %v (args %q)", command[2:], err, fs.Args())
	}
}

// TestInjectedSidecarArgsParse: the sidecar ferry inject writes runs
// `/ferry run` with consul-dataplane's arguments and environment; with
// every sidecar annotation that changes them, ferry parses them into what
// the annotations asked (the readiness listener on the pod IP, TLS on the
// merged metrics, lifecycle, DNS).
func TestInjectedSidecarArgsParse(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns", Annotations: map[string]string{
			inject.AnnotationInject:               "true",
			inject.AnnotationUseProxyHealthCheck:  "true",
			inject.AnnotationEnableMetrics:        "true",
			inject.AnnotationEnableMetricsMerging: "true",
			inject.AnnotationPrometheusCAPath:     "/certs/cas",
			inject.AnnotationPrometheusCertFile:   "/certs/tls.crt",
			inject.AnnotationPrometheusKeyFile:    "/certs/tls.key",
		}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app",
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
	}
	cfg := inject.DefaultConfig()
	cfg.DNS.Nameservers = []string{"10.96.0.10"}
	out, _, err := inject.Pod(cfg, inject.Namespace{Name: "ns"}, pod)
	if err != nil {
		t.Fatal(err)
	}
	var sc *corev1.Container
	for i, c := range out.Spec.Containers {
		if c.Name == "consul-dataplane" {
			sc = &out.Spec.Containers[i]
		}
	}
	if sc == nil {
		t.Fatal("no sidecar")
	}
	// The kubelet's environment: field references resolved.
	env := map[string]string{}
	for _, e := range sc.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			env[e.Name] = "198.18.0.5"
		case e.ValueFrom != nil:
			env[e.Name] = "x"
		default:
			env[e.Name] = e.Value
		}
	}
	args := sc.Args
	if len(args) > 0 && args[0] == "run" {
		args = args[1:]
	}
	c, _, err := parseDataplane(args, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatalf("parse %q: %v", args, err)
	}
	if c.ReadyAddr != "198.18.0.5:21000" {
		t.Errorf("ready addr %q, want the pod IP's 21000 (the sidecar's readiness probe)", c.ReadyAddr)
	}
	if p := sc.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != 21000 || p.HTTPGet.Path != "/ready" {
		t.Errorf("readiness probe %+v", sc.ReadinessProbe)
	}
	if c.PromCACertsPath != "/certs/cas" || c.PromCertFile != "/certs/tls.crt" || c.PromKeyFile != "/certs/tls.key" {
		t.Errorf("metrics TLS %q %q %q", c.PromCACertsPath, c.PromCertFile, c.PromKeyFile)
	}
	if c.PromServiceMetricsURL != "http://127.0.0.1:8080/metrics" || c.GracefulAddr != "127.0.0.1:20600" || c.DNSAddr != "127.0.0.1:8600" {
		t.Errorf("service metrics %q, lifecycle %q, DNS %q", c.PromServiceMetricsURL, c.GracefulAddr, c.DNSAddr)
	}
}
