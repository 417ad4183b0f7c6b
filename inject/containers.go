package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/ferrymesh/ferry/redirect"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// plan is every per-pod decision, read once from the annotations so that a
// bad value refuses the pod before anything is changed.
type plan struct {
	cfg                        Config
	tproxy, dns                bool
	overwriteProbes            bool
	proxyHealth                bool
	native, lifecycle          bool
	drain                      bool
	shutdownGrace, startupGrac int
	gracefulPort               int
	shutdownPath, startupPath  string
	probeDelay, probePeriod    int32
	probeFailures, probeTmo    int32
	startupFailure, liveFail   int
	concurrency                int
	extraArgs                  []string
	metrics, merging           bool
	scrapePort, mergedPort     int
	scrapePath                 string
	serviceMetricsPort         int
	serviceMetricsPath         string
	promCAFile, promCAPath     string
	promCertFile, promKeyFile  string
	resources                  corev1.ResourceRequirements
	userVolumes                []corev1.Volume
	userMounts                 []corev1.VolumeMount
}

func resolve(cfg Config, s settings) (*plan, error) {
	p := &plan{cfg: cfg}
	var errs []error
	b := func(dst *bool, key string, def bool) {
		v, err := s.boolean(key, def)
		errs = append(errs, err)
		*dst = v
	}
	n := func(dst *int, key string, def int) {
		v, err := s.nonNegative(key, def)
		errs = append(errs, err)
		*dst = v
	}
	n32 := func(dst *int32, key string, def int32) {
		var v int
		n(&v, key, int(def))
		*dst = int32(v)
	}
	var err error
	p.tproxy, err = s.booleanNS(KeyTransparentProxy, cfg.DefaultTransparentProxy)
	errs = append(errs, err)
	p.dns, err = s.booleanNS(KeyConsulDNS, cfg.DefaultConsulDNS)
	errs = append(errs, err)
	p.dns = p.dns && p.tproxy // DNS redirection rides on the redirect rules
	b(&p.overwriteProbes, AnnotationOverwriteProbes, cfg.DefaultOverwriteProbes)
	// consul-k8s ignores a malformed use-proxy-health-check (false); ferry
	// refuses it like every other boolean.
	b(&p.proxyHealth, AnnotationUseProxyHealthCheck, false)
	b(&p.native, AnnotationNativeSidecar, cfg.DefaultNativeSidecar)
	b(&p.lifecycle, AnnotationLifecycle, cfg.DefaultLifecycle)
	b(&p.drain, AnnotationLifecycleDrain, cfg.DefaultLifecycleDrain)
	n(&p.shutdownGrace, AnnotationLifecycleShutdownGrace, cfg.DefaultShutdownGraceSeconds)
	n(&p.startupGrac, AnnotationLifecycleStartupGrace, cfg.DefaultStartupGraceSeconds)
	p.gracefulPort, err = s.port(AnnotationLifecycleGracefulPort, cfg.DefaultGracefulPort, false)
	errs = append(errs, err)
	p.shutdownPath = s.str(AnnotationLifecycleShutdownPath, cfg.DefaultGracefulShutdownPath)
	p.startupPath = s.str(AnnotationLifecycleStartupPath, cfg.DefaultGracefulStartupPath)
	n32(&p.probeDelay, AnnotationSidecarProbeDelay, cfg.DefaultSidecarProbeDelay)
	n32(&p.probePeriod, AnnotationSidecarProbePeriod, cfg.DefaultSidecarProbePeriod)
	n32(&p.probeFailures, AnnotationSidecarProbeFailures, cfg.DefaultSidecarProbeFailures)
	n32(&p.probeTmo, AnnotationSidecarProbeTimeout, cfg.DefaultSidecarProbeTimeout)
	n(&p.startupFailure, AnnotationStartupFailureSecs, cfg.DefaultStartupFailureSeconds)
	n(&p.liveFail, AnnotationLivenessFailureSecs, cfg.DefaultLivenessFailureSeconds)
	n(&p.concurrency, AnnotationEnvoyConcurrency, cfg.EnvoyConcurrency)
	if raw, ok := s.ann[AnnotationEnvoyExtraArgs]; ok {
		// Envoy's own flags mean nothing to ferry, but consul-dataplane
		// passes them after "--" and ferry accepts them there.
		p.extraArgs = strings.Fields(raw)
	}

	b(&p.metrics, AnnotationEnableMetrics, cfg.DefaultEnableMetrics)
	b(&p.merging, AnnotationEnableMetricsMerging, cfg.DefaultEnableMetricsMerging)
	p.scrapePort, err = s.port(AnnotationPrometheusScrapePort, cfg.DefaultPrometheusScrapePort, false)
	errs = append(errs, err)
	p.mergedPort, err = s.port(AnnotationMergedMetricsPort, cfg.DefaultMergedMetricsPort, false)
	errs = append(errs, err)
	p.scrapePath = s.str(AnnotationPrometheusScrapePath, cfg.DefaultPrometheusScrapePath)
	p.serviceMetricsPath = s.str(AnnotationServiceMetricsPath, "/metrics")
	// The app's metrics port defaults to its service port; 0 means none,
	// and then nothing is merged.
	svcPort := 0
	if raw := s.ann[AnnotationPort]; raw != "" {
		if v, ok := portValue(s.pod, raw); ok {
			svcPort = v
		}
	} else if cs := s.pod.Spec.Containers; len(cs) > 0 && len(cs[0].Ports) > 0 {
		svcPort = int(cs[0].Ports[0].ContainerPort)
	}
	p.serviceMetricsPort, err = s.port(AnnotationServiceMetricsPort, svcPort, true)
	errs = append(errs, err)
	p.promCAFile, p.promCAPath = s.str(AnnotationPrometheusCAFile, ""), s.str(AnnotationPrometheusCAPath, "")
	p.promCertFile, p.promKeyFile = s.str(AnnotationPrometheusCertFile, ""), s.str(AnnotationPrometheusKeyFile, "")
	errs = append(errs, p.checkPromTLS())

	p.resources = *cfg.SidecarResources.DeepCopy()
	if p.resources.Limits == nil {
		p.resources.Limits = corev1.ResourceList{}
	}
	if p.resources.Requests == nil {
		p.resources.Requests = corev1.ResourceList{}
	}
	errs = append(errs,
		s.quantity(AnnotationSidecarCPULimit, p.resources.Limits, corev1.ResourceCPU),
		s.quantity(AnnotationSidecarCPURequest, p.resources.Requests, corev1.ResourceCPU),
		s.quantity(AnnotationSidecarMemoryLimit, p.resources.Limits, corev1.ResourceMemory),
		s.quantity(AnnotationSidecarMemoryRequest, p.resources.Requests, corev1.ResourceMemory))
	if len(p.resources.Limits) == 0 {
		p.resources.Limits = nil
	}
	if len(p.resources.Requests) == 0 {
		p.resources.Requests = nil
	}
	if raw, ok := s.ann[AnnotationUserVolume]; ok {
		if err := json.Unmarshal([]byte(raw), &p.userVolumes); err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: not a JSON list of volumes: %v", AnnotationUserVolume, err))
		}
	}
	if raw, ok := s.ann[AnnotationUserVolumeMount]; ok {
		if err := json.Unmarshal([]byte(raw), &p.userMounts); err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: not a JSON list of volume mounts: %v", AnnotationUserVolumeMount, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

// redirectConfig is consul-k8s's iptablesConfigJSON for the pod as it is
// before the sidecar joins it, validated by ferry redirect's own parser.
func (p *plan) redirectConfig(pod *corev1.Pod) (string, error) {
	c := redirect.ConsulJSON{
		ProxyUserID:       strconv.FormatInt(sidecarUID, 10),
		ProxyInboundPort:  inboundPort,
		ProxyOutboundPort: outboundPort,
		ExcludeUIDs:       []string{strconv.FormatInt(initUID, 10)},
	}
	if p.metrics {
		c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, strconv.Itoa(p.scrapePort))
	}
	if p.proxyHealth {
		c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, strconv.Itoa(proxyHealthPort))
	}
	if p.overwriteProbes {
		forAppContainers(pod, func(idx int, ct *corev1.Container) {
			if httpProbe(ct.LivenessProbe) {
				c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, strconv.Itoa(livenessPortBase+idx))
			}
			if httpProbe(ct.ReadinessProbe) {
				c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, strconv.Itoa(readinessPortBase+idx))
			}
			if httpProbe(ct.StartupProbe) {
				c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, strconv.Itoa(startupPortBase+idx))
			}
		})
	}
	s := settings{pod: pod, ann: pod.Annotations}
	c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, s.list(AnnotationExcludeInboundPorts)...)
	c.ExcludeOutboundPorts = append(c.ExcludeOutboundPorts, s.list(AnnotationExcludeOutboundPorts)...)
	c.ExcludeOutboundCIDRs = append(c.ExcludeOutboundCIDRs, s.list(AnnotationExcludeOutboundCIDRs)...)
	c.ExcludeUIDs = append(c.ExcludeUIDs, s.list(AnnotationExcludeUIDs)...)
	if p.dns {
		c.ConsulDNSIP, c.ConsulDNSPort = dnsBindHost, dnsBindPort
	}
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("inject: encode the redirect config: %w", err)
	}
	// Service names in port exclusions are resolved by the init container,
	// from its own /etc/services; the injector's may differ (the webhook's
	// image has none), so they are not judged here.
	v := c
	v.ExcludeInboundPorts, v.ExcludeOutboundPorts = numericPorts(c.ExcludeInboundPorts), numericPorts(c.ExcludeOutboundPorts)
	vb, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("inject: encode the redirect config: %w", err)
	}
	rc, _, err := redirect.ParseConsulJSON(vb)
	if err == nil {
		_, err = rc.Validate()
	}
	if err != nil {
		return "", refuse("the traffic redirection rules would not install: %v (check the %s annotations)", err, "transparent-proxy-exclude-*")
	}
	return string(b), nil
}

// numericPorts replaces port exclusions that name a service (alone or as
// an end of a range) with port 1, keeping everything else for validation.
func numericPorts(ports []string) []string {
	out := make([]string, len(ports))
	for i, p := range ports {
		parts := strings.Split(p, ":")
		for j, q := range parts {
			if q = strings.TrimSpace(q); q != "" && isLetter(q[0]) {
				parts[j] = "1"
			}
		}
		out[i] = strings.Join(parts, ":")
	}
	return out
}

func isLetter(b byte) bool { return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' }

// initContainer runs `ferry redirect` as root with NET_ADMIN, the only
// rights iptables needs, and exits before any app container starts.
func (p *plan) initContainer(redirectConfig string) corev1.Container {
	return corev1.Container{
		Name:            initName,
		Image:           p.cfg.InitImage,
		ImagePullPolicy: p.cfg.ImagePullPolicy,
		Command:         append([]string(nil), p.cfg.InitCommand...),
		Env:             []corev1.EnvVar{{Name: redirect.EnvRedirectConfig, Value: redirectConfig}},
		Resources:       *p.cfg.InitResources.DeepCopy(),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:    ptr(int64(0)),
			RunAsGroup:   ptr(int64(0)),
			RunAsNonRoot: ptr(false),
			Privileged:   ptr(false),
			Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN"}},
		},
	}
}

func ptr[T any](v T) *T { return &v }

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
}

// sidecar is consul-k8s's consul-dataplane container with ferry's image:
// the same name, environment, arguments, probes and security context.
func (p *plan) sidecar(pod *corev1.Pod) corev1.Container {
	c := corev1.Container{
		Name:            sidecarName,
		Image:           p.cfg.SidecarImage,
		ImagePullPolicy: p.cfg.ImagePullPolicy,
		Command:         append([]string(nil), p.cfg.SidecarCommand...),
		Args:            p.sidecarArgs(),
		Resources:       p.resources,
		Env: []corev1.EnvVar{
			// The root filesystem is read-only; the shared volume is not.
			{Name: "TMPDIR", Value: dataDir},
			fieldEnv("NODE_NAME", "spec.nodeName"),
			{Name: "DP_SERVICE_NODE_NAME", Value: "$(NODE_NAME)-virtual"},
			fieldEnv("POD_NAME", "metadata.name"),
			fieldEnv("POD_NAMESPACE", "metadata.namespace"),
			fieldEnv("POD_UID", "metadata.uid"),
			{Name: "DP_CREDENTIAL_LOGIN_META", Value: "pod=$(POD_NAMESPACE)/$(POD_NAME)"},
			{Name: "DP_CREDENTIAL_LOGIN_META1", Value: "pod=$(POD_NAMESPACE)/$(POD_NAME)"},
			{Name: "DP_CREDENTIAL_LOGIN_META2", Value: "pod-uid=$(POD_UID)"},
			fieldEnv("HOST_IP", "status.hostIP"),
		},
		VolumeMounts: []corev1.VolumeMount{{Name: volumeName, MountPath: dataDir}},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr(sidecarUID),
			RunAsGroup:               ptr(sidecarUID),
			RunAsNonRoot:             ptr(true),
			AllowPrivilegeEscalation: ptr(false),
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			ReadOnlyRootFilesystem:   ptr(true),
		},
	}
	if p.cfg.AuthMethod != "" {
		// In a webhook the ServiceAccount admission plugin has already
		// mounted the token into the app containers, not into ours; in a
		// manifest it will mount it into every container, ours included.
		if vm, ok := tokenMount(pod); ok {
			c.VolumeMounts = append(c.VolumeMounts, vm)
		}
	}
	readiness := corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(inboundPort)}}
	if p.proxyHealth {
		readiness = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(proxyHealthPort), Path: "/ready"}}
		c.Env = append(c.Env, fieldEnv("DP_ENVOY_READY_BIND_ADDRESS", "status.podIP"))
		c.Ports = append(c.Ports, corev1.ContainerPort{Name: "proxy-health-0", ContainerPort: proxyHealthPort})
	}
	c.ReadinessProbe = &corev1.Probe{ProbeHandler: readiness, InitialDelaySeconds: 1}
	if p.startupFailure > 0 {
		c.StartupProbe = &corev1.Probe{ProbeHandler: readiness, PeriodSeconds: 1, FailureThreshold: int32(p.startupFailure)}
	}
	if p.liveFail > 0 {
		c.LivenessProbe = &corev1.Probe{ProbeHandler: readiness, PeriodSeconds: 1, FailureThreshold: int32(p.liveFail)}
	}
	c.VolumeMounts = append(c.VolumeMounts, p.userMounts...)
	if p.metrics {
		c.Ports = append(c.Ports, corev1.ContainerPort{Name: "prometheus", ContainerPort: int32(p.scrapePort), Protocol: corev1.ProtocolTCP})
	}
	if p.native {
		c.RestartPolicy = ptr(corev1.ContainerRestartPolicyAlways)
		c.StartupProbe = &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{
				Command: append(append([]string(nil), p.cfg.SidecarCommand...), "-check-proxy-health")}},
			InitialDelaySeconds: p.probeDelay,
			PeriodSeconds:       p.probePeriod,
			FailureThreshold:    p.probeFailures,
			TimeoutSeconds:      p.probeTmo,
		}
	}
	return c
}

// sidecarArgs is consul-dataplane's argument list in consul-k8s's order
// (webhook/consul_dataplane_sidecar.go getContainerSidecarArgs).
func (p *plan) sidecarArgs() []string {
	cfg := p.cfg
	args := []string{
		"-addresses", cfg.ConsulAddresses,
		"-envoy-admin-bind-address=127.0.0.1",
		"-consul-dns-bind-addr=" + dnsBindHost,
		"-xds-bind-addr=127.0.0.1",
		"-grpc-port=" + strconv.Itoa(cfg.GRPCPort),
		"-proxy-service-id-path=" + proxyIDFile,
		"-log-level=" + cfg.LogLevel,
		"-log-json=" + strconv.FormatBool(cfg.LogJSON),
		"-envoy-concurrency=" + strconv.Itoa(p.concurrency),
		"-graceful-addr=127.0.0.1",
	}
	if cfg.SkipServerWatch {
		args = append(args, "-server-watch-disabled=true")
	}
	if cfg.AuthMethod != "" {
		args = append(args, "-credential-type=login", "-login-auth-method="+cfg.AuthMethod,
			"-login-bearer-token-path="+serviceAccountTokenDir+"/token")
	}
	if cfg.TLS {
		if cfg.TLSServerName != "" {
			args = append(args, "-tls-server-name="+cfg.TLSServerName)
		}
		if cfg.CACertsPath != "" {
			args = append(args, "-ca-certs="+cfg.CACertsPath)
		}
	} else {
		args = append(args, "-tls-disabled")
	}
	if p.proxyHealth {
		args = append(args, "-envoy-ready-bind-port="+strconv.Itoa(proxyHealthPort))
	}
	args = append(args, "-graceful-port="+strconv.Itoa(p.gracefulPort))
	if p.lifecycle {
		if p.drain {
			args = append(args, "-shutdown-drain-listeners")
		}
		args = append(args,
			"-shutdown-grace-period-seconds="+strconv.Itoa(p.shutdownGrace),
			"-graceful-shutdown-path="+p.shutdownPath,
			"-startup-grace-period-seconds="+strconv.Itoa(p.startupGrac),
			"-graceful-startup-path="+p.startupPath)
	}
	args = append(args, "-telemetry-prom-scrape-path="+p.scrapePath)
	if p.metrics && p.merging && p.serviceMetricsPort > 0 {
		args = append(args, "-telemetry-prom-merge-port="+strconv.Itoa(p.mergedPort),
			fmt.Sprintf("-telemetry-prom-service-metrics-url=http://127.0.0.1:%d%s", p.serviceMetricsPort, p.serviceMetricsPath))
	}
	if p.metrics && p.promCertFile != "" {
		// consul-k8s's four arguments, but whenever metrics are on:
		// consul-k8s passes them only with merging, and otherwise
		// serves the page in the clear although TLS was asked for.
		args = append(args, "-telemetry-prom-ca-certs-file="+p.promCAFile, "-telemetry-prom-ca-certs-path="+p.promCAPath,
			"-telemetry-prom-cert-file="+p.promCertFile, "-telemetry-prom-key-file="+p.promKeyFile)
	}
	if p.dns {
		args = append(args, "-consul-dns-bind-port="+strconv.Itoa(dnsBindPort))
	}
	if len(p.extraArgs) > 0 {
		args = append(append(args, "--"), p.extraArgs...)
	}
	return args
}

// checkPromTLS refuses half a TLS setup for the metrics, with consul-k8s's
// messages.
func (p *plan) checkPromTLS() error {
	if p.promCAFile == "" && p.promCAPath == "" && p.promCertFile == "" && p.promKeyFile == "" {
		return nil
	}
	switch {
	case p.promCAFile == "" && p.promCAPath == "":
		return fmt.Errorf("must set one of %q or %q when providing prometheus TLS config", AnnotationPrometheusCAFile, AnnotationPrometheusCAPath)
	case p.promCertFile == "":
		return fmt.Errorf("must set %q when providing prometheus TLS config", AnnotationPrometheusCertFile)
	case p.promKeyFile == "":
		return fmt.Errorf("must set %q when providing prometheus TLS config", AnnotationPrometheusKeyFile)
	}
	return nil
}

func tokenMount(pod *corev1.Pod) (corev1.VolumeMount, bool) {
	for _, ac := range pod.Spec.Containers {
		for _, vm := range ac.VolumeMounts {
			if vm.MountPath == serviceAccountTokenDir {
				return vm, true
			}
		}
	}
	return corev1.VolumeMount{}, false
}
