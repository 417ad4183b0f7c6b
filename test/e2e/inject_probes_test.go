package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/ferrymesh/ferry/inject"
	"github.com/ferrymesh/ferry/test/testbed"
)

// TestInjectedProbesPass: a Deployment whose liveness, readiness and
// startup probes (named and numbered ports) `ferry inject` rewrote passes
// them, with everything the pod needs taken from the injected output: the
// init container's redirect rules run in the pod as written, the
// Expose.Paths consul-k8s's endpoints controller derives from the pod and
// its original-pod annotation, ferry as UID 5995. The kubelet is the test
// process on the node (outside the pod), dialling the pod IP. The original
// probes fail in the same pod: that is what the rewrite fixes.
func TestInjectedProbesPass(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	ferry := testbed.FerryBinary(t)

	src, err := os.ReadFile(filepath.Join("..", "..", "inject", "testdata", "golden", "deployment-probes.in.yaml"))
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
	var dep appsv1.Deployment
	if err := yaml.UnmarshalStrict(out, &dep); err != nil {
		t.Fatal(err)
	}
	injected := &corev1.Pod{ObjectMeta: dep.Spec.Template.ObjectMeta, Spec: dep.Spec.Template.Spec}
	var original corev1.Pod
	if err := yaml.Unmarshal([]byte(injected.Annotations[inject.AnnotationOriginalPod]), &original); err != nil {
		t.Fatal(err)
	}

	// (a) the init container, run in the pod as the kubelet would run it.
	var initEnv []string
	for _, c := range injected.Spec.InitContainers {
		if c.Name != "consul-connect-inject-init" {
			continue
		}
		if len(c.Command) != 2 || c.Command[1] != "redirect" {
			t.Fatalf("init container command %q", c.Command)
		}
		for _, e := range c.Env {
			initEnv = append(initEnv, e.Name+"="+e.Value)
		}
	}
	if initEnv == nil {
		t.Fatalf("no init container in\n%s", out)
	}
	pod := tb.AddPod(t, "web")
	pod.ExecOK(t, testbed.Proc{Env: initEnv, Name: "init container"}, ferry, "redirect")

	// (b) the probes as the kubelet will send them, rewritten and original.
	type probe struct {
		name    string
		port    int
		path    string
		headers []corev1.HTTPHeader
	}
	probes := func(p *corev1.Pod) []probe {
		var ps []probe
		for _, c := range p.Spec.Containers {
			for kind, pr := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
				if pr == nil || pr.HTTPGet == nil {
					continue
				}
				port := pr.HTTPGet.Port.IntValue()
				if port == 0 { // a named port, as the kubelet resolves it
					for _, cp := range c.Ports {
						if cp.Name == pr.HTTPGet.Port.StrVal {
							port = int(cp.ContainerPort)
						}
					}
				}
				ps = append(ps, probe{c.Name + " " + kind, port, pr.HTTPGet.Path, pr.HTTPGet.HTTPHeaders})
			}
		}
		return ps
	}
	rewritten, originals := probes(injected), probes(&original)
	if len(rewritten) != 3 || len(originals) != 3 {
		t.Fatalf("probes: rewritten %+v, original %+v", rewritten, originals)
	}

	// (c) the registration consul-k8s would make, Expose.Paths included.
	paths, err := inject.ExposePaths(inject.DefaultConfig(), injected)
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) != 3 {
		t.Fatalf("expose paths %+v", paths)
	}
	appPort := 8080 // connect-service-port "http"
	r := tb.Register(t, testbed.Service{Name: "web", Pod: pod, Port: appPort, Expose: api.ExposeConfig{Paths: paths}})

	// The app answers its probes on both of its ports.
	for _, port := range []int{8080, 9090} {
		meshServeHTTP(t, pod, fmt.Sprintf(":%d", port), func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "app :%d %s %s", port, r.URL.Path, r.Header.Get("X-Probe"))
		})
	}
	meshRestart(t, t, pod, r.ProxyID)

	kubelet := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(p probe) (int, string, error) {
		req, err := http.NewRequest(http.MethodGet, "http://"+net.JoinHostPort(pod.IP.String(), strconv.Itoa(p.port))+p.path, nil)
		if err != nil {
			return 0, "", err
		}
		for _, h := range p.headers {
			req.Header.Set(h.Name, h.Value)
		}
		resp, err := kubelet.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	for _, p := range rewritten {
		var local int
		for _, e := range paths {
			if e.ListenerPort == p.port && e.Path == p.path {
				local = e.LocalPathPort
			}
		}
		want := fmt.Sprintf("app :%d %s ", local, p.path)
		if code, body, err := get(p); err != nil || code != 200 || !strings.HasPrefix(body, want) {
			t.Errorf("%s probe :%d%s: %d %q %v, want 200 %q", p.name, p.port, p.path, code, body, err, want)
		}
	}
	for _, p := range originals {
		if code, body, err := get(p); err == nil && (code == 200 || strings.Contains(body, "app ")) {
			t.Errorf("original %s probe :%d%s passed (%d %q): the app port takes plain HTTP", p.name, p.port, p.path, code, body)
		}
	}
}
