package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/test/testbed"
)

// TestInjectWebhookKubeAPIServer runs `ferry inject -webhook` behind a real
// kube-apiserver: pods created through the API are stored injected, exactly
// as `ferry inject` injects the same manifest; the namespace's labels are
// honoured; a pod consul-k8s would refuse is refused; and with the webhook
// down, the configuration's failurePolicy decides (Fail rejects, Ignore
// admits the pod as it is). No kubelet: pods stay Pending.
func TestInjectWebhookKubeAPIServer(t *testing.T) {
	k := testbed.StartKube(t)
	ferry := testbed.FerryBinary(t)
	dir := t.TempDir()

	caPEM, certFile, keyFile := servingCerts(t, dir, net.IPv4(127, 0, 0, 1))
	tokenFile := filepath.Join(dir, "token")
	resolv := filepath.Join(dir, "resolv.conf")
	writeFile(t, tokenFile, k.Token+"\n")
	writeFile(t, resolv, "search consul.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n")
	port := freePort(t)
	webhook := startWebhook(t, ferry, "-webhook", "-listen", "127.0.0.1:"+strconv.Itoa(port),
		"-tls-cert-file", certFile, "-tls-key-file", keyFile,
		"-kube-server", k.Server, "-kube-ca-file", k.CAFile, "-kube-token-file", tokenFile,
		"-resolv-conf", resolv, "-log-level", "debug")
	waitWebhook(t, webhook, port, caPEM)

	const selector = "ferry-e2e-inject"
	createNamespace(t, k, "shop", map[string]string{selector: "on"})
	createNamespace(t, k, "nodns", map[string]string{selector: "on", "consul.hashicorp.com/consul-dns": "false"})
	cfgName := "ferry-inject-e2e"
	k.MustDo(t, "POST", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", map[string]any{
		"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
		"metadata": map[string]any{"name": cfgName},
		"webhooks": []any{map[string]any{
			"name": "ferry-inject.ferrymesh.io",
			"clientConfig": map[string]any{
				"url":      fmt.Sprintf("https://127.0.0.1:%d/mutate", port),
				"caBundle": base64.StdEncoding.EncodeToString(caPEM),
			},
			"rules": []any{map[string]any{"apiGroups": []any{""}, "apiVersions": []any{"v1"},
				"operations": []any{"CREATE"}, "resources": []any{"pods"}, "scope": "Namespaced"}},
			"namespaceSelector":       map[string]any{"matchLabels": map[string]any{selector: "on"}},
			"failurePolicy":           "Fail",
			"sideEffects":             "None",
			"admissionReviewVersions": []any{"v1"},
			"timeoutSeconds":          5,
		}},
	}, 201)

	manifest, err := os.ReadFile(filepath.Join("..", "..", "inject", "testdata", "golden", "deployment-probes.in.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var deploy struct {
		Spec struct{ Template corev1.PodTemplateSpec }
	}
	if err := yaml.Unmarshal(manifest, &deploy); err != nil {
		t.Fatal(err)
	}
	podOf := func(name string) corev1.Pod {
		tmpl := deploy.Spec.Template.DeepCopy()
		p := corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
		p.APIVersion, p.Kind, p.Name = "v1", "Pod", name
		return p
	}
	// The webhook configuration takes effect through an informer: poll a
	// dry-run create until it comes back injected.
	pollUntil(t, "the webhook to be called", func() bool {
		code, b, _ := k.Do(context.Background(), "POST", "/api/v1/namespaces/shop/pods?dryRun=All", podOf("probe"))
		return code == 201 && strings.Contains(string(b), "connect-inject-status")
	})

	t.Run("stored pod is the injected one", func(t *testing.T) {
		pod := podOf("web-0")
		stored := createPod(t, k, "shop", pod)
		want := cliInject(t, ferry, resolv, "shop", pod, selector+"=on")
		comparePods(t, want, stored)
		if stored.Spec.DNSPolicy != corev1.DNSNone || stored.Spec.DNSConfig == nil ||
			strings.Join(stored.Spec.DNSConfig.Nameservers, ",") != "127.0.0.1,10.96.0.10" ||
			strings.Join(stored.Spec.DNSConfig.Searches, ",") != "shop.svc.cluster.local,svc.cluster.local,cluster.local" {
			t.Errorf("dns: %q %+v", stored.Spec.DNSPolicy, stored.Spec.DNSConfig)
		}
		var orig corev1.Pod
		if err := json.Unmarshal([]byte(stored.Annotations["consul.hashicorp.com/original-pod"]), &orig); err != nil {
			t.Fatalf("original-pod: %v", err)
		}
		if p := orig.Spec.Containers[0].LivenessProbe.HTTPGet.Port.String(); p != "http" {
			t.Errorf("original-pod liveness port %q, want the original \"http\"", p)
		}
	})
	t.Run("namespace label turns Consul DNS off", func(t *testing.T) {
		pod := podOf("web-1")
		stored := createPod(t, k, "nodns", pod)
		want := cliInject(t, ferry, resolv, "nodns", pod, "consul.hashicorp.com/consul-dns=false")
		comparePods(t, want, stored)
		if stored.Spec.DNSConfig != nil || stored.Spec.DNSPolicy == corev1.DNSNone {
			t.Errorf("dns configured despite the namespace label: %q %+v", stored.Spec.DNSPolicy, stored.Spec.DNSConfig)
		}
	})
	t.Run("pod without the annotation is stored as it is", func(t *testing.T) {
		pod := podOf("plain")
		delete(pod.Annotations, "consul.hashicorp.com/connect-inject")
		stored := createPod(t, k, "shop", pod)
		if _, ok := stored.Annotations["consul.hashicorp.com/connect-inject-status"]; ok || len(stored.Spec.InitContainers) != 0 || len(stored.Spec.Containers) != 2 {
			t.Errorf("plain pod was changed: %v %v", stored.Annotations, stored.Spec.InitContainers)
		}
	})
	t.Run("pod running as the proxy UID is refused", func(t *testing.T) {
		pod := podOf("bad")
		uid := int64(5995)
		pod.Spec.Containers[1].SecurityContext = &corev1.SecurityContext{RunAsUser: &uid}
		code, b, err := k.Do(context.Background(), "POST", "/api/v1/namespaces/shop/pods", pod)
		if err != nil || code != 400 || !strings.Contains(string(b), `container \"cache\" has runAsUser 5995`) {
			t.Errorf("create: %d %v\n%s", code, err, b)
		}
	})

	t.Run("deploy manifest is accepted by the API server", func(t *testing.T) {
		dryRunDeployManifest(t, k)
	})

	webhook.stop()
	t.Run("webhook down with failurePolicy Fail rejects pods", func(t *testing.T) {
		code, b, err := k.Do(context.Background(), "POST", "/api/v1/namespaces/shop/pods", podOf("down-fail"))
		if err != nil || code != 500 || !strings.Contains(string(b), "failed calling webhook") {
			t.Errorf("create: %d %v\n%s", code, err, b)
		}
	})
	t.Run("webhook down with failurePolicy Ignore admits pods unchanged", func(t *testing.T) {
		path := "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/" + cfgName
		var cfg map[string]any
		if err := json.Unmarshal(k.MustDo(t, "GET", path, nil, 200), &cfg); err != nil {
			t.Fatal(err)
		}
		cfg["webhooks"].([]any)[0].(map[string]any)["failurePolicy"] = "Ignore"
		k.MustDo(t, "PUT", path, cfg, 200)
		pollUntil(t, "failurePolicy Ignore to take effect", func() bool {
			code, _, _ := k.Do(context.Background(), "POST", "/api/v1/namespaces/shop/pods?dryRun=All", podOf("probe"))
			return code == 201
		})
		stored := createPod(t, k, "shop", podOf("down-ignore"))
		if _, ok := stored.Annotations["consul.hashicorp.com/connect-inject-status"]; ok || len(stored.Spec.InitContainers) != 0 {
			t.Errorf("pod injected although the webhook is down: %v", stored.Annotations)
		}
	})
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func pollUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// servingCerts makes a CA (the webhook's caBundle) and a serving
// certificate for ips signed by it, in dir.
func servingCerts(t *testing.T, dir string, ips ...net.IP) (caPEM []byte, certFile, keyFile string) {
	t.Helper()
	ca := testkit.NewCA(t, "ferry-e2e-ca")
	certPEM, keyPEM := ca.LeafPEM(t, 2, ips...)
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeFile(t, certFile, string(certPEM))
	writeFile(t, keyFile, string(keyPEM))
	return ca.PEM, certFile, keyFile
}

type webhookProc struct {
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
}

func startWebhook(t *testing.T, ferry string, args ...string) *webhookProc {
	t.Helper()
	cmd := testbed.MustCommand(t, ferry, append([]string{"inject"}, args...)...)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := &webhookProc{cmd: cmd, out: out, done: make(chan struct{})}
	go func() { cmd.Wait(); close(w.done) }()
	t.Cleanup(func() {
		w.stop()
		if t.Failed() {
			t.Logf("ferry inject -webhook output:\n%s", out.String())
		}
	})
	return w
}

// stop sends SIGTERM and waits for the graceful exit. Idempotent.
func (w *webhookProc) stop() {
	select {
	case <-w.done:
		return
	default:
	}
	w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(15 * time.Second):
		w.cmd.Process.Kill()
		<-w.done
	}
}

func waitWebhook(t *testing.T, w *webhookProc, port int, caPEM []byte) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: pool}}}
	pollUntil(t, "the webhook's /healthz", func() bool {
		select {
		case <-w.done:
			t.Fatalf("ferry inject -webhook exited:\n%s", w.out.String())
		default:
		}
		resp, err := client.Get(fmt.Sprintf("https://127.0.0.1:%d/healthz", port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

func createNamespace(t *testing.T, k *testbed.Kube, name string, labels map[string]string) {
	t.Helper()
	k.MustDo(t, "POST", "/api/v1/namespaces", map[string]any{"apiVersion": "v1", "kind": "Namespace",
		"metadata": map[string]any{"name": name, "labels": labels}}, 201)
}

// createPod creates pod and returns it as the API server stored it.
func createPod(t *testing.T, k *testbed.Kube, ns string, pod corev1.Pod) corev1.Pod {
	t.Helper()
	k.MustDo(t, "POST", "/api/v1/namespaces/"+ns+"/pods", pod, 201)
	var stored corev1.Pod
	if err := json.Unmarshal(k.MustDo(t, "GET", "/api/v1/namespaces/"+ns+"/pods/"+pod.Name, nil, 200), &stored); err != nil {
		t.Fatal(err)
	}
	return stored
}

// cliInject injects pod with `ferry inject` (the same resolv.conf and
// namespace labels as the webhook sees).
func cliInject(t *testing.T, ferry, resolv, ns string, pod corev1.Pod, nsLabel string) corev1.Pod {
	t.Helper()
	pod.Namespace = ns
	in, err := yaml.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	cmd := testbed.MustCommand(t, ferry, "inject", "-quiet", "-resolv-conf", resolv, "-namespace-label", nsLabel)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ferry inject: %v\n%s", err, stderr.String())
	}
	var got corev1.Pod
	if err := yaml.UnmarshalStrict(out, &got); err != nil {
		t.Fatalf("ferry inject output: %v\n%s", err, out)
	}
	return got
}

// containerView is what injection decides about a container, without the
// defaults the API server fills in (protocols, timeouts, pull policy).
type containerView struct {
	Name, Image     string
	Command, Args   []string
	Env             []corev1.EnvVar
	Ports           []string
	Probes          []string
	RestartPolicy   *corev1.ContainerRestartPolicy
	SecurityContext *corev1.SecurityContext
	Mounts          []string
}

func viewOf(cs []corev1.Container) []containerView {
	var out []containerView
	for _, c := range cs {
		v := containerView{Name: c.Name, Image: c.Image, Command: c.Command, Args: c.Args,
			RestartPolicy: c.RestartPolicy, SecurityContext: c.SecurityContext}
		for _, e := range c.Env {
			e = *e.DeepCopy()
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.APIVersion == "" {
				e.ValueFrom.FieldRef.APIVersion = "v1" // the API server's default
			}
			v.Env = append(v.Env, e)
		}
		for _, p := range c.Ports {
			v.Ports = append(v.Ports, fmt.Sprintf("%s:%d", p.Name, p.ContainerPort))
		}
		for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			switch {
			case p == nil:
				v.Probes = append(v.Probes, "-")
			case p.HTTPGet != nil:
				v.Probes = append(v.Probes, "http "+p.HTTPGet.Path+" "+p.HTTPGet.Port.String())
			case p.TCPSocket != nil:
				v.Probes = append(v.Probes, "tcp "+p.TCPSocket.Port.String())
			case p.Exec != nil:
				v.Probes = append(v.Probes, "exec "+strings.Join(p.Exec.Command, " "))
			}
		}
		for _, m := range c.VolumeMounts {
			v.Mounts = append(v.Mounts, m.Name+":"+m.MountPath)
		}
		out = append(out, v)
	}
	return out
}

func comparePods(t *testing.T, want, got corev1.Pod) {
	t.Helper()
	if w, g := viewOf(want.Spec.InitContainers), viewOf(got.Spec.InitContainers); !reflect.DeepEqual(w, g) {
		t.Errorf("init containers differ\nferry inject: %+v\nstored:       %+v", w, g)
	}
	if w, g := viewOf(want.Spec.Containers), viewOf(got.Spec.Containers); !reflect.DeepEqual(w, g) {
		t.Errorf("containers differ\nferry inject: %+v\nstored:       %+v", w, g)
	}
	for k, v := range want.Annotations {
		if k == "consul.hashicorp.com/original-pod" {
			continue // the webhook sees the pod after the API server's defaults
		}
		if got.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q", k, got.Annotations[k], v)
		}
	}
	for k, v := range want.Labels {
		if got.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, got.Labels[k], v)
		}
	}
	if !reflect.DeepEqual(want.Spec.DNSConfig, got.Spec.DNSConfig) {
		t.Errorf("dnsConfig %+v, want %+v", got.Spec.DNSConfig, want.Spec.DNSConfig)
	}
	var vols []string
	for _, v := range got.Spec.Volumes {
		if v.EmptyDir != nil {
			vols = append(vols, v.Name+":"+string(v.EmptyDir.Medium))
		}
	}
	if strings.Join(vols, ",") != "consul-connect-inject-data:Memory" {
		t.Errorf("volumes %v", vols)
	}
}

// dryRunDeployManifest creates every object of deploy/ferry-inject.yaml the
// bare API server knows (cert-manager's are skipped) with dryRun=All, so
// the API server's own validation checks the manifest users apply.
func dryRunDeployManifest(t *testing.T, k *testbed.Kube) {
	createNamespace(t, k, "consul", nil)
	k.DryRunManifest(t, filepath.Join("..", "..", "deploy", "ferry-inject.yaml"), map[string]string{
		"v1/ServiceAccount": "/api/v1/namespaces/consul/serviceaccounts",
		"v1/Service":        "/api/v1/namespaces/consul/services",
		"rbac.authorization.k8s.io/v1/ClusterRole":                     "/apis/rbac.authorization.k8s.io/v1/clusterroles",
		"rbac.authorization.k8s.io/v1/ClusterRoleBinding":              "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
		"apps/v1/Deployment":                                           "/apis/apps/v1/namespaces/consul/deployments",
		"admissionregistration.k8s.io/v1/MutatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
	}, "cert-manager.io/")
}
