package inject

import (
	"encoding/json"
	"fmt"

	"github.com/hashicorp/consul/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ExposePaths returns the Proxy.Expose.Paths that consul-k8s's endpoints
// controller registers for an injected pod whose HTTP probes were
// rewritten: for each probe of each container that the original-pod
// annotation also holds, the rewritten port is the listener, the original
// port (a name resolved on the original pod) the local path port, and the
// path the probe's (endpoints_controller.go createServiceRegistrations).
// A pod without transparent proxy, or with the probe overwrite off
// (annotation over cfg.DefaultOverwriteProbes), gets none.
func ExposePaths(cfg Config, pod *corev1.Pod) ([]api.ExposePath, error) {
	if pod.Annotations[KeyTransparentProxyStatus] != "enabled" {
		return nil, nil
	}
	overwrite, err := settings{pod: pod, ann: pod.Annotations}.boolean(AnnotationOverwriteProbes, cfg.DefaultOverwriteProbes)
	if err != nil || !overwrite {
		return nil, err
	}
	raw, ok := pod.Annotations[AnnotationOriginalPod]
	if !ok {
		return nil, fmt.Errorf("annotation %s is missing", AnnotationOriginalPod)
	}
	var original corev1.Pod
	if err := json.Unmarshal([]byte(raw), &original); err != nil {
		return nil, fmt.Errorf("annotation %s: %w", AnnotationOriginalPod, err)
	}
	var paths []api.ExposePath
	for _, mutated := range pod.Spec.Containers {
		for _, orig := range original.Spec.Containers {
			if orig.Name != mutated.Name {
				continue
			}
			for _, pr := range []struct{ mutated, orig *corev1.Probe }{
				{mutated.LivenessProbe, orig.LivenessProbe},
				{mutated.ReadinessProbe, orig.ReadinessProbe},
				{mutated.StartupProbe, orig.StartupProbe},
			} {
				if !httpProbe(pr.mutated) {
					continue
				}
				if !httpProbe(pr.orig) {
					return nil, fmt.Errorf("container %s: an HTTP probe the original pod does not have", mutated.Name)
				}
				local, err := portFromIntOrString(&original, pr.orig.HTTPGet.Port)
				if err != nil {
					return nil, fmt.Errorf("container %s: %w", mutated.Name, err)
				}
				paths = append(paths, api.ExposePath{
					ListenerPort:  pr.mutated.HTTPGet.Port.IntValue(),
					LocalPathPort: local,
					Path:          pr.mutated.HTTPGet.Path,
				})
			}
		}
	}
	return paths, nil
}

// portFromIntOrString is consul-k8s's PortValueFromIntOrString: a number
// as is, a name resolved among the pod's container ports.
func portFromIntOrString(pod *corev1.Pod, port intstr.IntOrString) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	n, ok := portValue(pod, port.StrVal)
	if !ok {
		return 0, fmt.Errorf("probe port %q is neither a container port name nor a number", port.StrVal)
	}
	return n, nil
}
