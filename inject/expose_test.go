package inject

import (
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func httpGet(path string, port intstr.IntOrString) *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: port}}}
}

// TestExposePaths: the paths consul-k8s's endpoints controller registers
// for an injected pod, named ports resolved on the original pod, the
// listener on the rewritten port; none without the probe overwrite.
func TestExposePaths(t *testing.T) {
	app := corev1.Container{Name: "app", Image: "app:1",
		Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 9090}},
		LivenessProbe:  httpGet("/healthz", intstr.FromString("http")),
		ReadinessProbe: httpGet("/ready", intstr.FromInt32(9090)),
		StartupProbe:   httpGet("/started", intstr.FromString("admin"))}
	side := corev1.Container{Name: "side", Image: "side:1",
		LivenessProbe:  httpGet("/live", intstr.FromInt32(7000)),
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(7001)}}}}
	inject := func(ann map[string]string) *corev1.Pod {
		out, skip, err := Pod(testConfig(), Namespace{Name: "ns"}, testPod(ann, app, side))
		if err != nil || skip != "" {
			t.Fatalf("inject: %q %v", skip, err)
		}
		return out
	}
	got, err := ExposePaths(testConfig(), inject(nil))
	if err != nil {
		t.Fatal(err)
	}
	want := []api.ExposePath{
		{ListenerPort: 20300, LocalPathPort: 8080, Path: "/healthz"},
		{ListenerPort: 20400, LocalPathPort: 9090, Path: "/ready"},
		{ListenerPort: 20500, LocalPathPort: 9090, Path: "/started"},
		{ListenerPort: 20301, LocalPathPort: 7000, Path: "/live"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("paths\n got %+v\nwant %+v", got, want)
	}

	for name, ann := range map[string]map[string]string{
		"overwrite off": {AnnotationOverwriteProbes: "false"},
		"no tproxy":     {KeyTransparentProxy: "false"},
	} {
		if got, err := ExposePaths(testConfig(), inject(ann)); err != nil || got != nil {
			t.Errorf("%s: %+v %v, want none", name, got, err)
		}
	}

	bad := inject(nil)
	bad.Annotations[AnnotationOriginalPod] = "{"
	if _, err := ExposePaths(testConfig(), bad); err == nil {
		t.Error("a malformed original-pod annotation gave no error")
	}
}
