package inject

import (
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// settings reads the pod's annotations (and its namespace's labels) over
// the Config defaults. Every malformed value is an error naming the key:
// consul-k8s refuses them too, and a silently ignored annotation would
// mesh a pod differently from what its author asked.
type settings struct {
	pod    *corev1.Pod
	ann    map[string]string
	labels map[string]string // the namespace's
}

func (s settings) boolean(key string, def bool) (bool, error) {
	raw, ok := s.ann[key]
	if !ok {
		return def, nil
	}
	b, err := strconv.ParseBool(strings.TrimSpace(raw))
	if err != nil {
		return false, fmt.Errorf("annotation %s: %q is not a boolean", key, raw)
	}
	return b, nil
}

// booleanNS is boolean with the namespace label between the annotation and
// the default, as consul-k8s reads transparent-proxy and consul-dns.
func (s settings) booleanNS(key string, def bool) (bool, error) {
	if _, ok := s.ann[key]; ok {
		return s.boolean(key, def)
	}
	if raw, ok := s.labels[key]; ok {
		b, err := strconv.ParseBool(strings.TrimSpace(raw))
		if err != nil {
			return false, fmt.Errorf("namespace label %s: %q is not a boolean", key, raw)
		}
		return b, nil
	}
	return def, nil
}

func (s settings) nonNegative(key string, def int) (int, error) {
	raw, ok := s.ann[key]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(raw), 10, 31)
	if err != nil {
		return 0, fmt.Errorf("annotation %s: %q is not a non-negative integer", key, raw)
	}
	return int(n), nil
}

func (s settings) str(key, def string) string {
	if raw, ok := s.ann[key]; ok && raw != "" {
		return raw
	}
	return def
}

// port reads a port annotation: a number or the name of a container port
// of the pod. Ports ferry listens on must be unprivileged (the sidecar has
// no capabilities); the app's own ports need not be.
func (s settings) port(key string, def int, privileged bool) (int, error) {
	raw, ok := s.ann[key]
	if !ok || raw == "" {
		return def, nil
	}
	p, ok := portValue(s.pod, raw)
	lo := 1024
	if privileged {
		lo = 1
	}
	if !ok || p < lo || p > 65535 {
		return 0, fmt.Errorf("annotation %s: %q is not a port in %d-65535 or a container port name", key, raw, lo)
	}
	return p, nil
}

// portValue resolves a container port name of the pod, else parses a
// number (consul-k8s common.PortValue, first element of a comma list).
func portValue(pod *corev1.Pod, v string) (int, bool) {
	v = strings.TrimSpace(strings.Split(v, ",")[0])
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.Name == v {
				return int(p.ContainerPort), true
			}
		}
	}
	n, err := strconv.ParseInt(v, 10, 32)
	if err != nil {
		return 0, false
	}
	return int(n), true
}

func (s settings) quantity(key string, dst corev1.ResourceList, name corev1.ResourceName) error {
	raw, ok := s.ann[key]
	if !ok {
		return nil
	}
	q, err := resource.ParseQuantity(strings.TrimSpace(raw))
	if err != nil {
		return fmt.Errorf("annotation %s: %q is not a quantity: %v", key, raw, err)
	}
	dst[name] = q
	return nil
}

// list splits a comma-list annotation into trimmed elements; redirect
// validates them (an empty element is refused there, with the key).
func (s settings) list(key string) []string {
	raw, ok := s.ann[key]
	if !ok {
		return nil
	}
	parts := strings.Split(raw, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return parts
}
