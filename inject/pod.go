package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Namespace is what injection needs to know of the pod's namespace.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// RefusedError is a pod the injector will not mesh as written, for the
// same reasons consul-k8s refuses it; the message says what to change.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "pod refused: " + e.Reason }

func refuse(format string, args ...any) error {
	return &RefusedError{Reason: fmt.Sprintf(format, args...)}
}

// Skip reasons: the pod is left exactly as it was.
const (
	SkipSystemNamespace = "kube-system and kube-public are never injected"
	SkipAlreadyInjected = "already injected (" + KeyInjectStatus + " is set)"
	SkipOptedOut        = AnnotationInject + " is false"
	SkipNotRequested    = "not annotated " + AnnotationInject + `: "true"`
)

// Pod returns in injected, or in itself and the reason it needs no
// injection. in is not modified. An error is a RefusedError when the pod
// itself is at fault.
func Pod(cfg Config, ns Namespace, in *corev1.Pod) (out *corev1.Pod, skip string, err error) {
	if ns.Name == "kube-system" || ns.Name == "kube-public" {
		return in, SkipSystemNamespace, nil
	}
	if in.Annotations[KeyInjectStatus] != "" {
		return in, SkipAlreadyInjected, nil
	}
	s := settings{pod: in, ann: in.Annotations, labels: ns.Labels}
	want, err := s.boolean(AnnotationInject, !cfg.RequireAnnotation)
	if err != nil {
		return nil, "", refuse("%v", err)
	}
	if !want {
		if _, ok := in.Annotations[AnnotationInject]; ok {
			return in, SkipOptedOut, nil
		}
		return in, SkipNotRequested, nil
	}
	original, err := json.Marshal(in)
	if err != nil {
		return nil, "", fmt.Errorf("inject: encode the original pod: %w", err)
	}
	pod := in.DeepCopy()
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	s = settings{pod: pod, ann: pod.Annotations, labels: ns.Labels}
	p, err := resolve(cfg, s)
	if err != nil {
		return nil, "", refuse("%v", err)
	}
	if err := p.check(pod); err != nil {
		return nil, "", err
	}
	if p.dns && len(cfg.DNS.Nameservers) == 0 {
		// Consul DNS alone would leave the pod unable to resolve anything
		// outside Consul.
		return nil, "", errors.New(`Consul DNS redirection is on but no cluster DNS server is configured (ferry inject -cluster-dns <kube-dns Service IP>, or annotate the pod consul.hashicorp.com/consul-dns: "false")`)
	}

	if _, ok := pod.Annotations[AnnotationPort]; !ok && len(pod.Spec.Containers) > 0 && len(pod.Spec.Containers[0].Ports) > 0 {
		cp := pod.Spec.Containers[0].Ports[0]
		if cp.Name != "" {
			pod.Annotations[AnnotationPort] = cp.Name
		} else {
			pod.Annotations[AnnotationPort] = strconv.Itoa(int(cp.ContainerPort))
		}
	}
	pod.Annotations[AnnotationOriginalPod] = string(original)

	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: volumeName,
		VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}})
	for i, c := range pod.Spec.Containers {
		for _, name := range s.list(AnnotationInjectMountVolumes) {
			if c.Name == name {
				pod.Spec.Containers[i].VolumeMounts = append(pod.Spec.Containers[i].VolumeMounts,
					corev1.VolumeMount{Name: volumeName, MountPath: dataDir})
			}
		}
	}
	pod.Spec.Volumes = append(pod.Spec.Volumes, p.userVolumes...)

	env := upstreamEnv(pod)
	for i := range pod.Spec.InitContainers {
		pod.Spec.InitContainers[i].Env = append(pod.Spec.InitContainers[i].Env, env...)
	}
	for i := range pod.Spec.Containers {
		pod.Spec.Containers[i].Env = append(pod.Spec.Containers[i].Env, env...)
	}

	var redirectJSON string
	if p.tproxy {
		if redirectJSON, err = p.redirectConfig(pod); err != nil {
			return nil, "", err
		}
		if !cfg.CNI {
			pod.Spec.InitContainers = append(pod.Spec.InitContainers, p.initContainer(redirectJSON))
		}
	}
	sidecar := p.sidecar(pod)
	switch {
	case p.native:
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, sidecar)
	case p.lifecycle:
		pod.Spec.Containers = append([]corev1.Container{sidecar}, pod.Spec.Containers...)
	default:
		pod.Spec.Containers = append(pod.Spec.Containers, sidecar)
	}

	pod.Annotations[KeyInjectStatus] = injected
	if p.tproxy {
		pod.Annotations[KeyTransparentProxyStatus] = "enabled"
	}
	if p.dns {
		p.configureDNS(pod, ns.Name)
	}
	if p.metrics {
		pod.Annotations[AnnotationPrometheusScrape] = "true"
		pod.Annotations[AnnotationPrometheusPort] = strconv.Itoa(p.scrapePort)
		pod.Annotations[AnnotationPrometheusPath] = p.scrapePath
	}
	if pod.Labels == nil {
		pod.Labels = map[string]string{}
	}
	pod.Labels[KeyInjectStatus] = injected
	pod.Labels[KeyManagedBy] = managedByValue
	if p.tproxy && p.overwriteProbes {
		forAppContainers(pod, func(idx int, c *corev1.Container) {
			if httpProbe(c.LivenessProbe) {
				c.LivenessProbe.HTTPGet.Port = intstr.FromInt32(int32(livenessPortBase + idx))
			}
			if httpProbe(c.ReadinessProbe) {
				c.ReadinessProbe.HTTPGet.Port = intstr.FromInt32(int32(readinessPortBase + idx))
			}
			if httpProbe(c.StartupProbe) {
				c.StartupProbe.HTTPGet.Port = intstr.FromInt32(int32(startupPortBase + idx))
			}
		})
	}
	if cfg.CNI && p.tproxy {
		pod.Annotations[AnnotationRedirectTraffic] = redirectJSON
	}
	pod.Annotations[AnnotationDualStack] = "false"
	return pod, "", nil
}

func httpProbe(p *corev1.Probe) bool { return p != nil && p.HTTPGet != nil }

// forAppContainers calls fn for each container except the sidecar, with
// the index consul-k8s gives it: the position among those containers, so
// the probe ports and their redirect exclusions agree however the sidecar
// is placed.
func forAppContainers(pod *corev1.Pod, fn func(idx int, c *corev1.Container)) {
	idx := 0
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == sidecarName {
			continue
		}
		fn(idx, &pod.Spec.Containers[i])
		idx++
	}
}

// upstreamEnv is <NAME>_CONNECT_SERVICE_HOST/PORT for each explicit
// upstream, as consul-k8s sets them on every container. Entries whose
// port does not resolve are skipped, as consul-k8s skips them.
func upstreamEnv(pod *corev1.Pod) []corev1.EnvVar {
	raw := pod.Annotations[AnnotationUpstreams]
	var env []corev1.EnvVar
	for _, u := range strings.FieldsFunc(raw, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' }) {
		parts := strings.SplitN(u, ":", 3)
		if len(parts) < 2 {
			continue
		}
		port, ok := portValue(pod, strings.TrimSpace(parts[1]))
		if !ok || port <= 0 {
			continue
		}
		name := strings.ToUpper(strings.ReplaceAll(strings.TrimSpace(parts[0]), "-", "_"))
		env = append(env,
			corev1.EnvVar{Name: name + "_CONNECT_SERVICE_HOST", Value: "127.0.0.1"},
			corev1.EnvVar{Name: name + "_CONNECT_SERVICE_PORT", Value: strconv.Itoa(port)})
	}
	return env
}

// configureDNS points the pod at the sidecar's DNS proxy first, then the
// cluster's servers: an NXDOMAIN from kube-dns would stop the resolver
// before it ever asked Consul.
func (p *plan) configureDNS(pod *corev1.Pod, podNS string) {
	d := p.cfg.DNS
	pod.Spec.DNSPolicy = corev1.DNSNone
	dc := &corev1.PodDNSConfig{Nameservers: append([]string{dnsBindHost}, d.Nameservers...)}
	releaseSearch := p.cfg.ReleaseNamespace + ".svc.cluster.local"
	for _, s := range d.Searches {
		if s == releaseSearch {
			s = podNS + ".svc.cluster.local"
		}
		dc.Searches = append(dc.Searches, s)
	}
	opt := func(name string, v, def int) {
		if v != def && v != 0 {
			val := strconv.Itoa(v)
			dc.Options = append(dc.Options, corev1.PodDNSConfigOption{Name: name, Value: &val})
		}
	}
	opt("ndots", d.Ndots, 1)
	opt("timeout", d.Timeout, 5)
	opt("attempts", d.Attempts, 2)
	pod.Spec.DNSConfig = dc
}

// check refuses what consul-k8s refuses.
func (p *plan) check(pod *corev1.Pod) error {
	if strings.Contains(pod.Annotations[AnnotationService], ",") {
		return refuse("%s %q names several services: multi-port pods are not supported by ferry (consul-k8s does not support them with transparent proxy either)",
			AnnotationService, pod.Annotations[AnnotationService])
	}
	if sc := pod.Spec.SecurityContext; sc != nil && sc.RunAsUser != nil && *sc.RunAsUser == sidecarUID {
		return refuse("the pod's securityContext.runAsUser is %d, the sidecar's UID: its traffic would bypass the proxy; run the pod as another user", sidecarUID)
	}
	for _, c := range append(append([]corev1.Container(nil), pod.Spec.InitContainers...), pod.Spec.Containers...) {
		if c.SecurityContext != nil && c.SecurityContext.RunAsUser != nil && *c.SecurityContext.RunAsUser == sidecarUID {
			return refuse("container %q has runAsUser %d, the sidecar's UID: its traffic would bypass the proxy; run it as another user", c.Name, sidecarUID)
		}
	}
	if p.dns && pod.Spec.DNSConfig != nil {
		return refuse("DNS redirection to Consul is not supported with an already defined dnsConfig on the pod; remove it or annotate the pod %s: \"false\"", KeyConsulDNS)
	}
	return nil
}
