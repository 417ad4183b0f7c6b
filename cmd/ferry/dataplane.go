package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The consul-dataplane command line. consul-k8s runs its sidecar image as
// `consul-dataplane <flags> [-- <envoy args>]` with DP_* environment; ferry
// runs the same way (agentless, against the servers) when
//   - it is invoked as consul-dataplane (the image links
//     /usr/local/bin/consul-dataplane to ferry), or
//   - its first argument is a flag rather than a subcommand (`ferry
//     -addresses ...`).
// ferry's own `run` flags are accepted there as well. Flags that only mean
// something to Envoy are accepted and ignored with one log line; those
// ferry does not implement yet are parsed and logged as such.

// dataplaneConfig is what the consul-dataplane command line says beyond
// runConfig: the parts ferry does not (yet) act on, kept so that they are
// visible and testable.
type dataplaneConfig struct {
	GRPCPort               int
	ServerWatchDisabled    bool
	Mode                   string
	ConsulDNSBindAddr      string
	ConsulDNSBindPort      int
	EnvoyAdminBindAddr     string
	EnvoyAdminBindPort     int
	EnvoyReadyBindAddr     string
	EnvoyReadyBindPort     int
	GracefulAddr           string
	GracefulPort           int
	GracefulShutdownPath   string
	GracefulStartupPath    string
	ShutdownDrainListeners bool
	ShutdownGracePeriod    int
	StartupGracePeriod     int
	PromScrapePath         string
	PromMergePort          int
	PromServiceMetricsURL  string
	PromRetention          string
	PromCACertsPath        string
	PromCACertsFile        string
	PromCertFile           string
	PromKeyFile            string
	CheckProxyHealth       bool
	// Ignored lists the Envoy-only flags given (and anything after --).
	Ignored []string
}

// dataplaneFlags are the consul-dataplane flags; name -> DP_* variable.
type dpFlags struct {
	fs     *flag.FlagSet
	getenv func(string) string
	envErr []string
}

func (d *dpFlags) str(p *string, name, env, def, usage string) {
	if v := d.getenv(env); v != "" {
		def = v
	}
	d.fs.StringVar(p, name, def, usage+" (env "+env+")")
}

func (d *dpFlags) integer(p *int, name, env string, def int, usage string) {
	if v := d.getenv(env); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			d.envErr = append(d.envErr, fmt.Sprintf("%s=%q: not an integer", env, v))
		} else {
			def = n
		}
	}
	d.fs.IntVar(p, name, def, usage+" (env "+env+")")
}

func (d *dpFlags) boolean(p *bool, name, env string, def bool, usage string) {
	if v := d.getenv(env); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			d.envErr = append(d.envErr, fmt.Sprintf("%s=%q: not a boolean", env, v))
		} else {
			def = b
		}
	}
	d.fs.BoolVar(p, name, def, usage+" (env "+env+")")
}

// envoyOnly are consul-dataplane flags that configure Envoy or its xDS
// server; ferry has no Envoy. Boolean ones are marked.
var envoyOnly = map[string]bool{
	"envoy-concurrency": false, "xds-bind-addr": false, "xds-bind-port": false,
	"dump-envoy-config-on-exit": true, "telemetry-use-central-config": true,
	"tls-cert": false, "tls-key": false, "service-node-id": false, "login-datacenter": false,
	"config-file": false,
}

// isDataplaneInvocation reports whether argv asks for the consul-dataplane
// command line (see the top of this file).
func isDataplaneInvocation(argv []string) bool {
	if len(argv) == 0 {
		return false
	}
	if filepath.Base(argv[0]) == "consul-dataplane" {
		return true
	}
	return len(argv) > 1 && strings.HasPrefix(argv[1], "-") && !isHelpOrVersion(argv[1])
}

func isHelpOrVersion(a string) bool {
	switch a {
	case "-h", "-help", "--help", "-version", "--version":
		return true
	}
	return false
}

// parseDataplane turns consul-dataplane's arguments and DP_* environment
// into ferry's configuration.
func parseDataplane(args []string, getenv func(string) string, stderr io.Writer) (runConfig, dataplaneConfig, error) {
	var c runConfig
	var dp dataplaneConfig
	a := &agentlessConfig{}
	c.Agentless = a
	fs := flag.NewFlagSet("consul-dataplane", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addRunFlags(fs, &c)
	// consul-dataplane's -log-level replaces ferry's (same meaning).
	lf := fs.Lookup("log-level")
	d := &dpFlags{fs: fs, getenv: getenv}
	if v := getenv("DP_LOG_LEVEL"); v != "" {
		lf.Value.Set(strings.ToLower(v))
		lf.DefValue = v
	}
	d.boolean(&c.LogJSON, "log-json", "DP_LOG_JSON", false, "log in JSON")

	d.str(&a.Addresses, "addresses", "DP_CONSUL_ADDRESSES", "", "Consul servers: a DNS name, IPs, or exec=<command> printing IPs")
	d.integer(&dp.GRPCPort, "grpc-port", "DP_CONSUL_GRPC_PORT", 8502, "servers' gRPC port (unused: ferry talks HTTP(S))")
	d.integer(&a.HTTPPort, "http-port", "DP_HTTP_PORT", 0, "servers' HTTP(S) port (ferry only; default 8501 with TLS, 8500 with -tls-disabled)")
	d.boolean(&dp.ServerWatchDisabled, "server-watch-disabled", "DP_SERVER_WATCH_DISABLED", false, "accepted (ferry re-resolves -addresses when every server fails)")
	d.str(&dp.Mode, "mode", "DP_MODE", "sidecar", "sidecar (dns-proxy is not supported)")

	d.boolean(&a.TLSDisabled, "tls-disabled", "DP_TLS_DISABLED", false, "plain HTTP to the servers")
	d.str(&a.CACerts, "ca-certs", "DP_CA_CERTS", "", "CA certificate file or directory for the servers' TLS")
	d.str(&a.TLSServerName, "tls-server-name", "DP_TLS_SERVER_NAME", "", "name expected in the servers' certificates")
	d.boolean(&a.TLSInsecure, "tls-insecure-skip-verify", "DP_TLS_INSECURE_SKIP_VERIFY", false, "do not verify the servers' certificates")

	d.str(&a.NodeName, "service-node-name", "DP_SERVICE_NODE_NAME", "", "Consul node of the proxy registration")
	d.str(&a.ProxyServiceID, "proxy-service-id", "DP_PROXY_SERVICE_ID", "", "proxy service ID")
	d.str(&a.ProxyServiceIDPath, "proxy-service-id-path", "DP_PROXY_SERVICE_ID_PATH", "", "file holding the proxy service ID")
	d.str(&a.Namespace, "service-namespace", "DP_SERVICE_NAMESPACE", "", "Enterprise namespace of the proxy")
	d.str(&a.Partition, "service-partition", "DP_SERVICE_PARTITION", "", "Enterprise partition of the proxy")

	d.str(&a.CredentialType, "credential-type", "DP_CREDENTIAL_TYPE", "", "static or login")
	d.str(&a.StaticToken, "static-token", "DP_CREDENTIAL_STATIC_TOKEN", "", "ACL token with -credential-type static")
	d.str(&a.LoginAuthMethod, "login-auth-method", "DP_CREDENTIAL_LOGIN_AUTH_METHOD", "", "auth method to log in with")
	d.str(&a.LoginNamespace, "login-namespace", "DP_CREDENTIAL_LOGIN_NAMESPACE", "", "Enterprise namespace of the auth method")
	d.str(&a.LoginPartition, "login-partition", "DP_CREDENTIAL_LOGIN_PARTITION", "", "Enterprise partition of the auth method")
	d.str(&a.LoginBearerToken, "login-bearer-token", "DP_CREDENTIAL_LOGIN_BEARER_TOKEN", "", "bearer token for the login")
	d.str(&a.LoginBearerTokenPath, "login-bearer-token-path", "DP_CREDENTIAL_LOGIN_BEARER_TOKEN_PATH", "", "file holding the bearer token (read at every login)")
	meta := metaFlag{}
	fs.Var(meta, "login-meta", "key=value attached to the login token, repeatable (env DP_CREDENTIAL_LOGIN_META, DP_CREDENTIAL_LOGIN_META1..9)")

	d.str(&dp.ConsulDNSBindAddr, "consul-dns-bind-addr", "DP_CONSUL_DNS_BIND_ADDR", "127.0.0.1", "DNS address")
	d.integer(&dp.ConsulDNSBindPort, "consul-dns-bind-port", "DP_CONSUL_DNS_BIND_PORT", -1, "DNS port (-1: no DNS)")
	d.str(&dp.EnvoyAdminBindAddr, "envoy-admin-bind-address", "DP_ENVOY_ADMIN_BIND_ADDRESS", "127.0.0.1", "admin (/ready, /metrics) address")
	d.integer(&dp.EnvoyAdminBindPort, "envoy-admin-bind-port", "DP_ENVOY_ADMIN_BIND_PORT", 19000, "admin port")
	d.str(&dp.EnvoyReadyBindAddr, "envoy-ready-bind-address", "DP_ENVOY_READY_BIND_ADDRESS", "", "readiness listener address, serving GET /ready alone (consul-k8s: the pod IP)")
	d.integer(&dp.EnvoyReadyBindPort, "envoy-ready-bind-port", "DP_ENVOY_READY_BIND_PORT", 0, "readiness listener port (0: none; consul-k8s: 21000 with use-proxy-health-check)")

	d.str(&dp.GracefulAddr, "graceful-addr", "DP_GRACEFUL_ADDR", "127.0.0.1", "lifecycle endpoint address")
	d.integer(&dp.GracefulPort, "graceful-port", "DP_GRACEFUL_PORT", 20300, "lifecycle endpoint port (opened when a lifecycle flag is given)")
	d.str(&dp.GracefulShutdownPath, "graceful-shutdown-path", "DP_GRACEFUL_SHUTDOWN_PATH", "/graceful_shutdown", "lifecycle path: close inbound, keep outbound for the grace period, then exit")
	d.str(&dp.GracefulStartupPath, "graceful-startup-path", "DP_GRACEFUL_STARTUP_PATH", "/graceful_startup", "lifecycle path: answers 200 once ready (503 after the startup grace period)")
	d.boolean(&dp.ShutdownDrainListeners, "shutdown-drain-listeners", "DP_SHUTDOWN_DRAIN_LISTENERS", false, "accepted: ferry always closes the inbound listener at the start of the grace period")
	d.integer(&dp.ShutdownGracePeriod, "shutdown-grace-period-seconds", "DP_SHUTDOWN_GRACE_PERIOD_SECONDS", 0, "seconds outbound keeps serving after SIGTERM or the shutdown path (inbound closed); then -drain-timeout")
	d.integer(&dp.StartupGracePeriod, "startup-grace-period-seconds", "DP_STARTUP_GRACE_PERIOD_SECONDS", 0, "seconds the startup path waits for ready")
	d.str(&dp.PromScrapePath, "telemetry-prom-scrape-path", "DP_TELEMETRY_PROM_SCRAPE_PATH", "/metrics", "path of the merged metrics on the registration's envoy_prometheus_bind_addr")
	d.integer(&dp.PromMergePort, "telemetry-prom-merge-port", "DP_TELEMETRY_PROM_MERGE_PORT", 20100, "accepted: ferry merges on envoy_prometheus_bind_addr itself, with no second listener")
	d.str(&dp.PromServiceMetricsURL, "telemetry-prom-service-metrics-url", "DP_TELEMETRY_PROM_SERVICE_METRICS_URL", "", "the app's metrics, merged into the scrape (failing: HTTP 500)")
	d.str(&dp.PromRetention, "telemetry-prom-retention-time", "DP_TELEMETRY_PROM_RETENTION_TIME", "60s", "accepted: ferry's metrics are cumulative counters and gauges, never aggregated over a window")
	d.str(&dp.PromCACertsPath, "telemetry-prom-ca-certs-path", "DP_TELEMETRY_PROM_CA_CERTS_PATH", "", "CA file or directory verifying the scraper's client certificate when it gives one (with -telemetry-prom-cert-file: HTTPS only)")
	d.str(&dp.PromCACertsFile, "telemetry-prom-ca-certs-file", "DP_TELEMETRY_PROM_CA_CERTS_FILE", "", "CA file, as -telemetry-prom-ca-certs-path (consul-k8s passes both)")
	d.str(&dp.PromCertFile, "telemetry-prom-cert-file", "DP_TELEMETRY_PROM_CERT_FILE", "", "certificate the merged metrics are served with over HTTPS (reloaded when it changes)")
	d.str(&dp.PromKeyFile, "telemetry-prom-key-file", "DP_TELEMETRY_PROM_KEY_FILE", "", "its private key")
	fs.BoolVar(&dp.CheckProxyHealth, "check-proxy-health", false, "GET the admin /ready (3 s timeout) and exit 0 only if ready")

	var ignored []string
	for name, isBool := range envoyOnly {
		fs.Var(&ignoredFlag{name: name, isBool: isBool, seen: &ignored}, name, "Envoy-only: accepted and ignored")
	}

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, dp, &exitError{code: 0, err: errHelp}
		}
		return c, dp, &exitError{code: 2, err: err}
	}
	sort.Strings(ignored)
	dp.Ignored = append(ignored, fs.Args()...) // after --: Envoy's arguments
	if len(d.envErr) > 0 {
		return c, dp, usageError("consul-dataplane: %s", strings.Join(d.envErr, "; "))
	}

	// Login meta: the flag, then DP_CREDENTIAL_LOGIN_META and META1..9
	// (consul-k8s sets pod=<ns>/<name> and pod-uid=<uid> there).
	envMeta := []string{getenv("DP_CREDENTIAL_LOGIN_META")}
	for i := 1; i <= 9; i++ {
		envMeta = append(envMeta, getenv(fmt.Sprintf("DP_CREDENTIAL_LOGIN_META%d", i)))
	}
	for _, kv := range envMeta {
		if kv == "" {
			continue
		}
		if err := meta.Set(kv); err != nil {
			return c, dp, usageError("consul-dataplane: DP_CREDENTIAL_LOGIN_META: %v", err)
		}
	}
	if len(meta) > 0 {
		a.LoginMeta = meta
	}

	c.AdminAddr = net.JoinHostPort(dp.EnvoyAdminBindAddr, strconv.Itoa(dp.EnvoyAdminBindPort))
	// Lifecycle (lifecycle.go). The listener opens only when a lifecycle
	// flag is given: consul-k8s then passes -graceful-port=20600, and the
	// bare default 20300 is the first liveness probe's Expose port.
	c.ShutdownGracePeriod = time.Duration(dp.ShutdownGracePeriod) * time.Second
	c.StartupGracePeriod = time.Duration(dp.StartupGracePeriod) * time.Second
	c.GracefulShutdownPath, c.GracefulStartupPath = dp.GracefulShutdownPath, dp.GracefulStartupPath
	if dp.GracefulPort != 20300 || dp.ShutdownDrainListeners || dp.ShutdownGracePeriod > 0 || dp.StartupGracePeriod > 0 {
		c.GracefulAddr = joinHostPort(dp.GracefulAddr, dp.GracefulPort)
	}
	c.CheckProxyHealth = dp.CheckProxyHealth
	c.PromScrapePath, c.PromServiceMetricsURL = dp.PromScrapePath, dp.PromServiceMetricsURL
	c.PromCACertsPath, c.PromCertFile, c.PromKeyFile = dp.PromCACertsPath, dp.PromCertFile, dp.PromKeyFile
	if c.PromCACertsPath == "" {
		c.PromCACertsPath = dp.PromCACertsFile
	}
	if dp.EnvoyReadyBindPort != 0 {
		// consul-dataplane adds no listener without an address; ferry
		// listens on every address then rather than leave a readiness
		// probe failing.
		c.ReadyAddr = joinHostPort(dp.EnvoyReadyBindAddr, dp.EnvoyReadyBindPort)
	}
	if dp.ConsulDNSBindPort > 0 {
		c.DNSAddr = net.JoinHostPort(dp.ConsulDNSBindAddr, strconv.Itoa(dp.ConsulDNSBindPort))
	} else {
		c.DNSAddr = ""
	}
	if a.HTTPPort == 0 {
		a.HTTPPort = 8501
		if a.TLSDisabled {
			a.HTTPPort = 8500
		}
	}
	c.ProxyID = a.ProxyServiceID
	if dp.CheckProxyHealth {
		return c, dp, nil
	}
	switch {
	case a.Addresses == "":
		return c, dp, usageError("consul-dataplane: -addresses is required")
	case a.NodeName == "":
		return c, dp, usageError("consul-dataplane: -service-node-name is required")
	case a.ProxyServiceID == "" && a.ProxyServiceIDPath == "":
		return c, dp, usageError("consul-dataplane: -proxy-service-id or -proxy-service-id-path is required")
	case a.HTTPPort <= 0 || a.HTTPPort > 65535:
		return c, dp, usageError("consul-dataplane: bad -http-port %d", a.HTTPPort)
	case dp.Mode != "sidecar":
		return c, dp, usageError("consul-dataplane: -mode %q is not supported (only sidecar)", dp.Mode)
	}
	switch a.CredentialType {
	case "":
	case "static":
		if a.StaticToken == "" {
			return c, dp, usageError("consul-dataplane: -credential-type static needs -static-token")
		}
	case "login":
		if a.LoginAuthMethod == "" {
			return c, dp, usageError("consul-dataplane: -credential-type login needs -login-auth-method")
		}
		if a.LoginBearerToken == "" && a.LoginBearerTokenPath == "" {
			return c, dp, usageError("consul-dataplane: -credential-type login needs -login-bearer-token or -login-bearer-token-path")
		}
	default:
		return c, dp, usageError("consul-dataplane: -credential-type must be static or login, not %q", a.CredentialType)
	}
	return c, dp, validateRunConfig(c)
}

// runDataplane runs ferry from the consul-dataplane command line.
func runDataplane(args []string, stdout, stderr io.Writer) error {
	cfg, dp, err := parseDataplane(args, os.Getenv, stderr)
	if err != nil {
		return err
	}
	if dp.CheckProxyHealth {
		return checkProxyHealth(cfg.AdminAddr)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "ferry", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr,
		JSONFormat: cfg.LogJSON})
	logDataplaneGaps(dp, log)
	return startRun(cfg, stderr)
}

// logDataplaneGaps says, once, what of the command line ferry ignores or
// does not implement yet.
func logDataplaneGaps(dp dataplaneConfig, log hclog.Logger) {
	if len(dp.Ignored) > 0 {
		log.Info("consul-dataplane: Envoy-only arguments accepted and ignored", "args", strings.Join(dp.Ignored, " "))
	}
}

// metaFlag is a repeatable key=value flag.
type metaFlag map[string]string

func (m metaFlag) String() string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return strings.Join(out, ",")
}

func (m metaFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not key=value", v)
	}
	m[k] = val
	return nil
}

// ignoredFlag accepts an Envoy-only flag and records that it was given.
type ignoredFlag struct {
	name   string
	isBool bool
	seen   *[]string
}

func (f *ignoredFlag) String() string { return "" }
func (f *ignoredFlag) Set(v string) error {
	*f.seen = append(*f.seen, "-"+f.name+"="+v)
	return nil
}
func (f *ignoredFlag) IsBoolFlag() bool { return f.isBool }
