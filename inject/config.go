package inject

import (
	corev1 "k8s.io/api/core/v1"
)

// Annotations and labels consul-k8s reads or writes on a pod (consul-k8s
// control-plane/connect-inject/constants). ferry honours the same keys so
// that a consul-k8s user's manifests mean the same thing.
const (
	AnnotationInject               = "consul.hashicorp.com/connect-inject"
	KeyInjectStatus                = "consul.hashicorp.com/connect-inject-status"
	KeyManagedBy                   = "consul.hashicorp.com/connect-inject-managed-by"
	KeyTransparentProxy            = "consul.hashicorp.com/transparent-proxy"
	KeyTransparentProxyStatus      = "consul.hashicorp.com/transparent-proxy-status"
	KeyConsulDNS                   = "consul.hashicorp.com/consul-dns"
	AnnotationExcludeInboundPorts  = "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports"
	AnnotationExcludeOutboundPorts = "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports"
	AnnotationExcludeOutboundCIDRs = "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs"
	AnnotationExcludeUIDs          = "consul.hashicorp.com/transparent-proxy-exclude-uids"
	AnnotationOverwriteProbes      = "consul.hashicorp.com/transparent-proxy-overwrite-probes"
	AnnotationRedirectTraffic      = "consul.hashicorp.com/redirect-traffic-config"
	AnnotationDualStack            = "consul.hashicorp.com/dual-stack"
	AnnotationOriginalPod          = "consul.hashicorp.com/original-pod"
	AnnotationService              = "consul.hashicorp.com/connect-service"
	AnnotationPort                 = "consul.hashicorp.com/connect-service-port"
	AnnotationUpstreams            = "consul.hashicorp.com/connect-service-upstreams"
	AnnotationInjectMountVolumes   = "consul.hashicorp.com/connect-inject-mount-volume"
	AnnotationUserVolume           = "consul.hashicorp.com/consul-sidecar-user-volume"
	AnnotationUserVolumeMount      = "consul.hashicorp.com/consul-sidecar-user-volume-mount"
	AnnotationUseProxyHealthCheck  = "consul.hashicorp.com/use-proxy-health-check"
	AnnotationEnvoyConcurrency     = "consul.hashicorp.com/consul-envoy-proxy-concurrency"
	AnnotationEnvoyExtraArgs       = "consul.hashicorp.com/envoy-extra-args"

	AnnotationSidecarCPULimit      = "consul.hashicorp.com/sidecar-proxy-cpu-limit"
	AnnotationSidecarCPURequest    = "consul.hashicorp.com/sidecar-proxy-cpu-request"
	AnnotationSidecarMemoryLimit   = "consul.hashicorp.com/sidecar-proxy-memory-limit"
	AnnotationSidecarMemoryRequest = "consul.hashicorp.com/sidecar-proxy-memory-request"
	AnnotationStartupFailureSecs   = "consul.hashicorp.com/sidecar-proxy-startup-failure-seconds"
	AnnotationLivenessFailureSecs  = "consul.hashicorp.com/sidecar-proxy-liveness-failure-seconds"

	AnnotationLifecycle              = "consul.hashicorp.com/enable-sidecar-proxy-lifecycle"
	AnnotationLifecycleDrain         = "consul.hashicorp.com/enable-sidecar-proxy-lifecycle-shutdown-drain-listeners"
	AnnotationLifecycleShutdownGrace = "consul.hashicorp.com/sidecar-proxy-lifecycle-shutdown-grace-period-seconds"
	AnnotationLifecycleStartupGrace  = "consul.hashicorp.com/sidecar-proxy-lifecycle-startup-grace-period-seconds"
	AnnotationLifecycleGracefulPort  = "consul.hashicorp.com/sidecar-proxy-lifecycle-graceful-port"
	AnnotationLifecycleShutdownPath  = "consul.hashicorp.com/sidecar-proxy-lifecycle-graceful-shutdown-path"
	AnnotationLifecycleStartupPath   = "consul.hashicorp.com/sidecar-proxy-lifecycle-graceful-startup-path"

	AnnotationNativeSidecar              = "consul.hashicorp.com/enable-consul-dataplane-as-sidecar"
	AnnotationSidecarProbeDelay          = "consul.hashicorp.com/sidecar-initial-probe-check-delay-seconds"
	AnnotationSidecarProbePeriod         = "consul.hashicorp.com/sidecar-probe-period-seconds"
	AnnotationSidecarProbeFailures       = "consul.hashicorp.com/sidecar-probe-failure-threshold"
	AnnotationSidecarProbeTimeout        = "consul.hashicorp.com/sidecar-probe-check-timeout-seconds"
	AnnotationEnableMetrics              = "consul.hashicorp.com/enable-metrics"
	AnnotationEnableMetricsMerging       = "consul.hashicorp.com/enable-metrics-merging"
	AnnotationMergedMetricsPort          = "consul.hashicorp.com/merged-metrics-port"
	AnnotationPrometheusScrapePort       = "consul.hashicorp.com/prometheus-scrape-port"
	AnnotationPrometheusScrapePath       = "consul.hashicorp.com/prometheus-scrape-path"
	AnnotationServiceMetricsPort         = "consul.hashicorp.com/service-metrics-port"
	AnnotationServiceMetricsPath         = "consul.hashicorp.com/service-metrics-path"
	AnnotationPrometheusCAFile           = "consul.hashicorp.com/prometheus-ca-file"
	AnnotationPrometheusCAPath           = "consul.hashicorp.com/prometheus-ca-path"
	AnnotationPrometheusCertFile         = "consul.hashicorp.com/prometheus-cert-file"
	AnnotationPrometheusKeyFile          = "consul.hashicorp.com/prometheus-key-file"
	AnnotationPrometheusScrape           = "prometheus.io/scrape"
	AnnotationPrometheusPort             = "prometheus.io/port"
	AnnotationPrometheusPath             = "prometheus.io/path"
	managedByValue                       = "consul-k8s-endpoints-controller"
	injected                             = "injected"
	sidecarName                          = "consul-dataplane"
	initName                             = "consul-connect-inject-init"
	volumeName                           = "consul-connect-inject-data"
	dataDir                              = "/consul/connect-inject"
	proxyIDFile                          = dataDir + "/proxyid"
	serviceAccountTokenDir               = "/var/run/secrets/kubernetes.io/serviceaccount"
	sidecarUID                     int64 = 5995
	initUID                        int64 = 5996
	inboundPort                          = 20000
	outboundPort                         = 15001
	proxyHealthPort                      = 21000
	livenessPortBase                     = 20300
	readinessPortBase                    = 20400
	startupPortBase                      = 20500
	dnsBindHost                          = "127.0.0.1"
	dnsBindPort                          = 8600
)

// Config is the injector's cluster-wide settings: what consul-k8s takes from
// its Helm values and injector flags. Per-pod annotations override the
// Default* fields. Zero values are not defaults: start from DefaultConfig.
type Config struct {
	// SidecarImage and InitImage are ferry's two images (Dockerfile stages
	// sidecar and init).
	SidecarImage, InitImage string
	// SidecarCommand starts ferry in consul-dataplane-compatible mode; the
	// dataplane arguments follow as the container's args. The native
	// sidecar's startup probe runs SidecarCommand + "-check-proxy-health".
	SidecarCommand []string
	// InitCommand is `ferry redirect` in the init image; it reads the rules
	// from CONSUL_REDIRECT_TRAFFIC_CONFIG.
	InitCommand     []string
	ImagePullPolicy corev1.PullPolicy

	// ConsulAddresses is consul-dataplane's -addresses: the servers' DNS
	// name (consul-k8s: <fullname>-server.<ns>.svc) or exec=<cmd>.
	ConsulAddresses string
	GRPCPort        int
	// TLS is -tls-disabled when false; with it, TLSServerName and
	// CACertsPath (a file the sidecar can read, mounted by the operator)
	// become -tls-server-name and -ca-certs when set.
	TLS                     bool
	TLSServerName           string
	CACertsPath             string
	AuthMethod              string // ACL auth method; empty: no -credential-type=login
	LogLevel                string
	LogJSON                 bool
	EnvoyConcurrency        int
	SkipServerWatch         bool
	ReleaseNamespace        string // the injector's namespace, for DNS searches
	RequireAnnotation       bool   // inject only pods annotated connect-inject: "true"
	CNI                     bool   // the redirect rules come from a CNI plugin: no init container
	DefaultTransparentProxy bool
	DefaultOverwriteProbes  bool
	DefaultConsulDNS        bool

	// DNS is the cluster DNS the pod falls back to after Consul DNS (the
	// injector's /etc/resolv.conf, as consul-k8s reads it).
	DNS DNSConfig

	DefaultLifecycle            bool
	DefaultLifecycleDrain       bool
	DefaultShutdownGraceSeconds int
	DefaultStartupGraceSeconds  int
	DefaultGracefulPort         int
	DefaultGracefulShutdownPath string
	DefaultGracefulStartupPath  string

	DefaultNativeSidecar          bool
	DefaultSidecarProbeDelay      int32
	DefaultSidecarProbePeriod     int32
	DefaultSidecarProbeFailures   int32
	DefaultSidecarProbeTimeout    int32
	DefaultStartupFailureSeconds  int
	DefaultLivenessFailureSeconds int

	DefaultEnableMetrics        bool
	DefaultEnableMetricsMerging bool
	DefaultPrometheusScrapePort int
	DefaultPrometheusScrapePath string
	DefaultMergedMetricsPort    int

	// SidecarResources are the sidecar's default requests and limits; the
	// sidecar-proxy-{cpu,memory}-{request,limit} annotations override them.
	SidecarResources corev1.ResourceRequirements
	InitResources    corev1.ResourceRequirements
}

// DNSConfig is a parsed resolv.conf: the servers and search list the pod
// keeps after Consul DNS, and the options that differ from glibc's defaults.
type DNSConfig struct {
	Nameservers []string
	Searches    []string
	Ndots       int // 1 by default
	Timeout     int // 5 by default
	Attempts    int // 2 by default
}

// DefaultConfig is consul-k8s's stock Helm values with ferry's images:
// injection on annotation, transparent proxy, probe rewrite and Consul DNS
// on, lifecycle on (sidecar first, graceful port 20600), metrics off.
func DefaultConfig() Config {
	return Config{
		SidecarImage:                "ferry:sidecar",
		InitImage:                   "ferry:init",
		SidecarCommand:              []string{"/ferry", "run"},
		InitCommand:                 []string{"/usr/local/bin/ferry", "redirect"},
		ConsulAddresses:             "consul-server.consul.svc",
		GRPCPort:                    8502,
		LogLevel:                    "info",
		EnvoyConcurrency:            2,
		ReleaseNamespace:            "consul",
		RequireAnnotation:           true,
		DefaultTransparentProxy:     true,
		DefaultOverwriteProbes:      true,
		DefaultConsulDNS:            true,
		DNS:                         DNSConfig{Ndots: 1, Timeout: 5, Attempts: 2},
		DefaultLifecycle:            true,
		DefaultLifecycleDrain:       true,
		DefaultShutdownGraceSeconds: 30,
		DefaultGracefulPort:         20600,
		DefaultGracefulShutdownPath: "/graceful_shutdown",
		DefaultGracefulStartupPath:  "/graceful_startup",
		DefaultSidecarProbeDelay:    1,
		DefaultSidecarProbePeriod:   1,
		DefaultSidecarProbeFailures: 10,
		DefaultSidecarProbeTimeout:  5,
		DefaultPrometheusScrapePort: 20200,
		DefaultPrometheusScrapePath: "/metrics",
		DefaultMergedMetricsPort:    20100,
	}
}
