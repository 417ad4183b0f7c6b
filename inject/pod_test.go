package inject

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func testPod(ann map[string]string, containers ...corev1.Container) *corev1.Pod {
	a := map[string]string{AnnotationInject: "true"}
	for k, v := range ann {
		a[k] = v
	}
	if len(containers) == 0 {
		containers = []corev1.Container{{Name: "app", Image: "app:1", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}
	}
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", Annotations: a},
		Spec: corev1.PodSpec{Containers: containers}}
}

func container(t *testing.T, cs []corev1.Container, name string) *corev1.Container {
	t.Helper()
	for i := range cs {
		if cs[i].Name == name {
			return &cs[i]
		}
	}
	t.Fatalf("no container %q in %v", name, cs)
	return nil
}

func redirectEnv(t *testing.T, pod *corev1.Pod) map[string]any {
	t.Helper()
	c := container(t, pod.Spec.InitContainers, initName)
	var m map[string]any
	if err := json.Unmarshal([]byte(c.Env[0].Value), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestPodRefuses: what consul-k8s refuses, ferry refuses with a message
// that says what to change.
func TestPodRefuses(t *testing.T) {
	uid := ptr(sidecarUID)
	cases := []struct {
		name string
		pod  func() *corev1.Pod
		want string
	}{
		{"pod runs as the sidecar UID", func() *corev1.Pod {
			p := testPod(nil)
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: uid}
			return p
		}, "securityContext.runAsUser is 5995"},
		{"container runs as the sidecar UID", func() *corev1.Pod {
			p := testPod(nil)
			p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsUser: uid}
			return p
		}, `container "app" has runAsUser 5995`},
		{"dnsConfig with DNS redirection", func() *corev1.Pod {
			p := testPod(nil)
			p.Spec.DNSConfig = &corev1.PodDNSConfig{Nameservers: []string{"1.1.1.1"}}
			return p
		}, "already defined dnsConfig"},
		{"multi-port", func() *corev1.Pod { return testPod(map[string]string{AnnotationService: "a,b"}) }, "multi-port"},
		{"bad boolean", func() *corev1.Pod { return testPod(map[string]string{KeyTransparentProxy: "yes please"}) }, KeyTransparentProxy},
		{"bad inject boolean", func() *corev1.Pod { return testPod(map[string]string{AnnotationInject: "sure"}) }, AnnotationInject},
		{"bad quantity", func() *corev1.Pod { return testPod(map[string]string{AnnotationSidecarCPULimit: "lots"}) }, AnnotationSidecarCPULimit},
		{"privileged scrape port", func() *corev1.Pod {
			return testPod(map[string]string{AnnotationEnableMetrics: "true", AnnotationPrometheusScrapePort: "80"})
		}, AnnotationPrometheusScrapePort},
		{"empty exclusion element", func() *corev1.Pod { return testPod(map[string]string{AnnotationExcludeInboundPorts: "8080,"}) }, "would not install"},
		{"bad exclusion CIDR", func() *corev1.Pod {
			return testPod(map[string]string{AnnotationExcludeOutboundCIDRs: "10.0.0.0/33"})
		}, "10.0.0.0/33"},
		{"bad user volumes", func() *corev1.Pod { return testPod(map[string]string{AnnotationUserVolume: "{"}) }, AnnotationUserVolume},
		{"metrics TLS without a CA", func() *corev1.Pod {
			return testPod(map[string]string{AnnotationEnableMetrics: "true", AnnotationPrometheusCertFile: "/c", AnnotationPrometheusKeyFile: "/k"})
		}, "must set one of"},
		{"metrics TLS without a key", func() *corev1.Pod {
			return testPod(map[string]string{AnnotationEnableMetrics: "true", AnnotationPrometheusCAFile: "/ca", AnnotationPrometheusCertFile: "/c"})
		}, AnnotationPrometheusKeyFile},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := c.pod()
			before := in.DeepCopy()
			_, _, err := Pod(testConfig(), Namespace{Name: "ns"}, in)
			var re *RefusedError
			if !errors.As(err, &re) {
				t.Fatalf("err = %v, want a RefusedError", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("err = %v, want it to mention %q", err, c.want)
			}
			if !reflect.DeepEqual(in, before) {
				t.Error("the input pod was modified")
			}
		})
	}
}

// TestPodDNSConfigAllowedWithoutDNS: the dnsConfig refusal is only about
// DNS redirection.
func TestPodDNSConfigAllowedWithoutDNS(t *testing.T) {
	p := testPod(map[string]string{KeyConsulDNS: "false"})
	p.Spec.DNSConfig = &corev1.PodDNSConfig{Nameservers: []string{"1.1.1.1"}}
	out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, p)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(out.Spec.DNSConfig, p.Spec.DNSConfig) || out.Spec.DNSPolicy != "" {
		t.Errorf("dns changed: %v %v", out.Spec.DNSPolicy, out.Spec.DNSConfig)
	}
	if _, ok := redirectEnv(t, out)["ConsulDNSIP"]; !ok || redirectEnv(t, out)["ConsulDNSIP"] != "" {
		t.Errorf("DNS redirected although consul-dns is false: %v", redirectEnv(t, out))
	}
}

// TestPodNamespaceLabels: annotation, then namespace label, then default.
func TestPodNamespaceLabels(t *testing.T) {
	cases := []struct {
		name           string
		ann, labels    map[string]string
		tproxy, dns    bool
		wantInitFerry  bool
		wantDNSPolicyN bool
	}{
		{"defaults", nil, nil, true, true, true, true},
		{"namespace turns tproxy off", nil, map[string]string{KeyTransparentProxy: "false"}, false, false, false, false},
		{"annotation beats namespace", map[string]string{KeyTransparentProxy: "true"}, map[string]string{KeyTransparentProxy: "false"}, true, true, true, true},
		{"namespace turns DNS off", nil, map[string]string{KeyConsulDNS: "false"}, true, false, true, false},
		{"annotation turns DNS back on", map[string]string{KeyConsulDNS: "true"}, map[string]string{KeyConsulDNS: "false"}, true, true, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, skip, err := Pod(testConfig(), Namespace{Name: "ns", Labels: c.labels}, testPod(c.ann))
			if err != nil || skip != "" {
				t.Fatalf("Pod: %q %v", skip, err)
			}
			hasInit := false
			for _, ic := range out.Spec.InitContainers {
				hasInit = hasInit || ic.Name == initName
			}
			if hasInit != c.wantInitFerry {
				t.Errorf("init container present = %v, want %v", hasInit, c.wantInitFerry)
			}
			if (out.Spec.DNSPolicy == corev1.DNSNone) != c.wantDNSPolicyN {
				t.Errorf("dnsPolicy = %q", out.Spec.DNSPolicy)
			}
			if (out.Annotations[KeyTransparentProxyStatus] == "enabled") != c.tproxy {
				t.Errorf("tproxy status = %q", out.Annotations[KeyTransparentProxyStatus])
			}
			args := strings.Join(container(t, out.Spec.Containers, sidecarName).Args, " ")
			if strings.Contains(args, "-consul-dns-bind-port=8600") != c.dns {
				t.Errorf("sidecar args %q: DNS want %v", args, c.dns)
			}
		})
	}
}

// TestPodProbeIndexIgnoresSidecar: with lifecycle on the sidecar is first
// in containers, yet the first app container still gets 20300+0, and the
// redirect exclusions name the same ports.
func TestPodProbeIndexIgnoresSidecar(t *testing.T) {
	probe := func(port int) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/h", Port: intstr.FromInt32(int32(port))}}}
	}
	a := corev1.Container{Name: "a", Image: "a", LivenessProbe: probe(1000)}
	b := corev1.Container{Name: "b", Image: "b", ReadinessProbe: probe(2000), StartupProbe: probe(3000),
		LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 4000}}}}
	for _, lifecycle := range []string{"true", "false"} {
		out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(map[string]string{AnnotationLifecycle: lifecycle}, a, b))
		if err != nil {
			t.Fatal(err)
		}
		if first := out.Spec.Containers[0].Name; (first == sidecarName) != (lifecycle == "true") {
			t.Errorf("lifecycle %s: first container %q", lifecycle, first)
		}
		ca, cb := container(t, out.Spec.Containers, "a"), container(t, out.Spec.Containers, "b")
		if got := ca.LivenessProbe.HTTPGet.Port.IntValue(); got != 20300 {
			t.Errorf("lifecycle %s: a liveness %d", lifecycle, got)
		}
		if got := cb.ReadinessProbe.HTTPGet.Port.IntValue(); got != 20401 {
			t.Errorf("lifecycle %s: b readiness %d", lifecycle, got)
		}
		if got := cb.StartupProbe.HTTPGet.Port.IntValue(); got != 20501 {
			t.Errorf("lifecycle %s: b startup %d", lifecycle, got)
		}
		if cb.LivenessProbe.GRPC.Port != 4000 {
			t.Errorf("grpc probe changed")
		}
		got := redirectEnv(t, out)["ExcludeInboundPorts"]
		want := []any{"20300", "20401", "20501"}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("lifecycle %s: ExcludeInboundPorts %v, want %v", lifecycle, got, want)
		}
		var orig corev1.Pod
		if err := json.Unmarshal([]byte(out.Annotations[AnnotationOriginalPod]), &orig); err != nil {
			t.Fatal(err)
		}
		if orig.Spec.Containers[0].LivenessProbe.HTTPGet.Port.IntValue() != 1000 {
			t.Errorf("original-pod does not keep the original probe: %v", orig.Spec.Containers[0].LivenessProbe)
		}
	}
}

// TestPodOverwriteProbesOff keeps the probes and excludes nothing for them.
func TestPodOverwriteProbesOff(t *testing.T) {
	c := corev1.Container{Name: "a", Image: "a", LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(8080)}}}}
	out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(map[string]string{AnnotationOverwriteProbes: "false"}, c))
	if err != nil {
		t.Fatal(err)
	}
	if p := container(t, out.Spec.Containers, "a").LivenessProbe.HTTPGet.Port.IntValue(); p != 8080 {
		t.Errorf("probe moved to %d", p)
	}
	if ex := redirectEnv(t, out)["ExcludeInboundPorts"]; ex != nil {
		t.Errorf("ExcludeInboundPorts = %v", ex)
	}
}

// TestPodNativeSidecar: an init container after ferry redirect, with
// restartPolicy Always and the health-check startup probe.
func TestPodNativeSidecar(t *testing.T) {
	out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(map[string]string{
		AnnotationNativeSidecar: "true", AnnotationSidecarProbePeriod: "3", AnnotationSidecarProbeTimeout: "7"}))
	if err != nil {
		t.Fatal(err)
	}
	ics := out.Spec.InitContainers
	if len(ics) != 2 || ics[0].Name != initName || ics[1].Name != sidecarName {
		t.Fatalf("init containers %v", ics)
	}
	sc := ics[1]
	if sc.RestartPolicy == nil || *sc.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("restartPolicy %v", sc.RestartPolicy)
	}
	sp := sc.StartupProbe
	if sp == nil || sp.Exec == nil || strings.Join(sp.Exec.Command, " ") != "/ferry run -check-proxy-health" ||
		sp.PeriodSeconds != 3 || sp.TimeoutSeconds != 7 || sp.FailureThreshold != 10 || sp.InitialDelaySeconds != 1 {
		t.Errorf("startup probe %+v", sp)
	}
	for _, c := range out.Spec.Containers {
		if c.Name == sidecarName {
			t.Error("sidecar also in containers")
		}
	}
}

// TestPodSkips leaves pods alone for the reasons consul-k8s does.
func TestPodSkips(t *testing.T) {
	cfg := testConfig()
	already := testPod(map[string]string{KeyInjectStatus: injected})
	plain := testPod(nil)
	delete(plain.Annotations, AnnotationInject)
	cases := []struct {
		name string
		cfg  Config
		ns   string
		pod  *corev1.Pod
		want string
	}{
		{"kube-system", cfg, "kube-system", testPod(nil), SkipSystemNamespace},
		{"kube-public", cfg, "kube-public", testPod(nil), SkipSystemNamespace},
		{"already injected", cfg, "ns", already, SkipAlreadyInjected},
		{"opted out", cfg, "ns", testPod(map[string]string{AnnotationInject: "false"}), SkipOptedOut},
		{"not asked", cfg, "ns", plain, SkipNotRequested},
	}
	for _, c := range cases {
		out, skip, err := Pod(c.cfg, Namespace{Name: c.ns}, c.pod)
		if err != nil || skip != c.want || out != c.pod {
			t.Errorf("%s: skip %q err %v (same pod %v), want %q", c.name, skip, err, out == c.pod, c.want)
		}
	}
	cfg.RequireAnnotation = false
	if _, skip, err := Pod(cfg, Namespace{Name: "ns"}, plain); err != nil || skip != "" {
		t.Errorf("default injection: skip %q err %v", skip, err)
	}
}

// TestPodCNI: no init container; the rules go in the annotation the CNI
// plugin reads.
func TestPodCNI(t *testing.T) {
	cfg := testConfig()
	cfg.CNI = true
	out, _, err := Pod(cfg, Namespace{Name: "ns"}, testPod(nil))
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Spec.InitContainers) != 0 {
		t.Errorf("init containers %v", out.Spec.InitContainers)
	}
	js := out.Annotations[AnnotationRedirectTraffic]
	if !strings.Contains(js, `"ProxyUserID":"5995"`) || !strings.Contains(js, `"ExcludeUIDs":["5996"]`) {
		t.Errorf("redirect annotation %q", js)
	}
}

// TestPodACLAndTLS: the login and TLS arguments, and the token mount the
// ServiceAccount plugin gave the app containers.
func TestPodACLAndTLS(t *testing.T) {
	cfg := testConfig()
	cfg.AuthMethod, cfg.TLS, cfg.TLSServerName, cfg.CACertsPath = "consul-k8s-auth-method", true, "server.dc1.consul", "/consul/ca/tls.crt"
	app := corev1.Container{Name: "app", Image: "app", VolumeMounts: []corev1.VolumeMount{{Name: "kube-api-access-x", MountPath: serviceAccountTokenDir, ReadOnly: true}}}
	out, _, err := Pod(cfg, Namespace{Name: "ns"}, testPod(nil, app))
	if err != nil {
		t.Fatal(err)
	}
	sc := container(t, out.Spec.Containers, sidecarName)
	args := strings.Join(sc.Args, " ")
	for _, want := range []string{"-credential-type=login -login-auth-method=consul-k8s-auth-method -login-bearer-token-path=/var/run/secrets/kubernetes.io/serviceaccount/token",
		"-tls-server-name=server.dc1.consul -ca-certs=/consul/ca/tls.crt"} {
		if !strings.Contains(args, want) {
			t.Errorf("args %q lack %q", args, want)
		}
	}
	if strings.Contains(args, "-tls-disabled") {
		t.Error("-tls-disabled with TLS on")
	}
	if len(sc.VolumeMounts) != 2 || sc.VolumeMounts[1].Name != "kube-api-access-x" {
		t.Errorf("mounts %v", sc.VolumeMounts)
	}
}

// TestPodServiceNamePortsNotJudged: a service name in a port exclusion is
// the init container's to resolve (its /etc/services), not the injector's.
func TestPodServiceNamePortsNotJudged(t *testing.T) {
	out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(map[string]string{
		AnnotationExcludeOutboundPorts: "no-such-service-anywhere,postgresql:9000"}))
	if err != nil {
		t.Fatal(err)
	}
	if got := redirectEnv(t, out)["ExcludeOutboundPorts"]; !reflect.DeepEqual(got, []any{"no-such-service-anywhere", "postgresql:9000"}) {
		t.Errorf("ExcludeOutboundPorts = %v", got)
	}
	if _, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(map[string]string{AnnotationExcludeOutboundPorts: "http:1x"})); err == nil {
		t.Error("a malformed range end was not refused")
	}
}

// TestPodMetricsTLS: the prometheus-{ca-file,ca-path,cert-file,key-file}
// annotations become consul-k8s's four arguments whenever metrics are on
// (consul-k8s: only with merging), and nothing without metrics.
func TestPodMetricsTLS(t *testing.T) {
	tlsAnn := map[string]string{AnnotationPrometheusCAFile: "/certs/ca.pem", AnnotationPrometheusCertFile: "/certs/tls.crt", AnnotationPrometheusKeyFile: "/certs/tls.key"}
	want := "-telemetry-prom-ca-certs-file=/certs/ca.pem -telemetry-prom-ca-certs-path= -telemetry-prom-cert-file=/certs/tls.crt -telemetry-prom-key-file=/certs/tls.key"
	for _, c := range []struct {
		name    string
		metrics map[string]string
		want    bool
	}{
		{"metrics and merging", map[string]string{AnnotationEnableMetrics: "true", AnnotationEnableMetricsMerging: "true"}, true},
		{"metrics alone", map[string]string{AnnotationEnableMetrics: "true"}, true},
		{"no metrics", nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			ann := map[string]string{}
			for k, v := range tlsAnn {
				ann[k] = v
			}
			for k, v := range c.metrics {
				ann[k] = v
			}
			out, _, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(ann))
			if err != nil {
				t.Fatal(err)
			}
			args := strings.Join(container(t, out.Spec.Containers, sidecarName).Args, " ")
			if got := strings.Contains(args, want); got != c.want {
				t.Errorf("args %q: TLS arguments present %v, want %v", args, got, c.want)
			}
		})
	}
}
