package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/dns"
	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/hashicorp/go-hclog"
)

// ferry run's configuration: its own command line (the consul-dataplane
// one is in dataplane.go) and the checks both share.

// defaultMaxConnections bounds each listener by default: unbounded, a
// connection flood ends in EMFILE for the whole process (app connections
// through the outbound listener, DNS, the Consul watches share the fd
// table). 10,000 established per listener, about 2 fds each, keeps inbound
// and outbound together within a 65,536 RLIMIT_NOFILE.
const defaultMaxConnections = 10000

// runConfig is everything `ferry run` needs, from flags and environment.
type runConfig struct {
	ProxyID, SidecarFor string
	HTTPAddr, Token     string
	Inbound, Outbound   string // listener overrides ("" = from the registration)
	LocalApp            string
	AdminAddr           string
	MaxConnections      int
	ProxyUID            int
	ConnectTimeout      time.Duration
	IdleTimeout         time.Duration
	DrainTimeout        time.Duration
	LogLevel            string
	Permissive          bool
	HandshakeTimeout    time.Duration
	LiveRevocation      bool
	Tunnels             bool
	KTLS                ktls.Mode
	VirtualCIDRs        prefixFlag
	DNSAddr             string
	DNSRecursors        repeatedFlag
	ClusterDomain       string
	ConsulDNSAddr       string
	ConsulDNSMore       []string // agentless: the servers' DNS
	DefaultPolicy       string
	LogJSON             bool
	// Lifecycle (consul-dataplane's, lifecycle.go): the shutdown grace
	// period (inbound closed, outbound serving) before the drain, the
	// lifecycle listener ("" = none) and its paths.
	ShutdownGracePeriod  time.Duration
	StartupGracePeriod   time.Duration
	GracefulAddr         string
	GracefulShutdownPath string
	GracefulStartupPath  string
	CheckProxyHealth     bool
	// Merged metrics on the registration's envoy_prometheus_bind_addr
	// (consul-dataplane's -telemetry-prom-*).
	PromScrapePath        string
	PromServiceMetricsURL string
	// TLS on it: all three or none (-telemetry-prom-ca-certs-path, a CA
	// file or directory; -telemetry-prom-cert-file, -key-file).
	PromCACertsPath, PromCertFile, PromKeyFile string
	// ReadyAddr ("" = none) serves GET /ready alone, outside the admin
	// listener (consul-dataplane's -envoy-ready-bind-address/-port: the
	// pod IP's 21000 the kubelet probes with use-proxy-health-check).
	ReadyAddr string
	// Agentless, when set, talks to Consul servers instead of a local
	// agent (the consul-dataplane command line, dataplane.go).
	Agentless *agentlessConfig

	// kernelTLS is -ktls as decided at start (decideKTLS).
	kernelTLS proxy.KTLS
}

func parseRunFlags(args []string, stderr io.Writer) (runConfig, error) {
	var c runConfig
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addRunFlags(fs, &c)
	// The consul-dataplane command line has its own spelling of these.
	fs.DurationVar(&c.ShutdownGracePeriod, "shutdown-grace-period", 0, "on SIGTERM or the lifecycle shutdown path, close the inbound listener at once but keep outbound serving this long, then drain for -drain-timeout (consul-dataplane's -shutdown-grace-period-seconds)")
	fs.DurationVar(&c.StartupGracePeriod, "startup-grace-period", 0, "how long the lifecycle startup path waits for ready")
	fs.StringVar(&c.GracefulAddr, "graceful-addr", "", "lifecycle HTTP address (e.g. 127.0.0.1:20600) serving -graceful-shutdown-path and -graceful-startup-path (empty disables)")
	fs.StringVar(&c.GracefulShutdownPath, "graceful-shutdown-path", "/graceful_shutdown", "lifecycle path that starts the graceful shutdown")
	fs.StringVar(&c.GracefulStartupPath, "graceful-startup-path", "/graceful_startup", "lifecycle path that answers once ready (or 503 after -startup-grace-period)")
	fs.BoolVar(&c.CheckProxyHealth, "check-proxy-health", false, "GET the admin /ready of a running ferry (-admin-addr, 3 s timeout) and exit 0 only if it is ready")
	// The merged metrics (envoy_prometheus_bind_addr), spelled as
	// consul-dataplane's so the two command lines say the same.
	fs.StringVar(&c.PromScrapePath, "telemetry-prom-scrape-path", "/metrics", "path of the merged metrics on the registration's envoy_prometheus_bind_addr")
	fs.StringVar(&c.PromServiceMetricsURL, "telemetry-prom-service-metrics-url", "", "the app's metrics, merged into that scrape (a failing source: HTTP 500)")
	fs.StringVar(&c.PromCACertsPath, "telemetry-prom-ca-certs-path", "", "CA file or directory verifying the scraper's client certificate when it gives one")
	fs.StringVar(&c.PromCertFile, "telemetry-prom-cert-file", "", "serve the merged metrics over HTTPS only, with this certificate (reloaded when it changes)")
	fs.StringVar(&c.PromKeyFile, "telemetry-prom-key-file", "", "its private key")
	fs.StringVar(&c.ReadyAddr, "ready-addr", "", "also serve GET /ready alone on this address (e.g. POD_IP:21000 for a kubelet readiness probe; consul-dataplane's -envoy-ready-bind-address/-port); empty disables")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, &exitError{code: 0, err: errHelp}
		}
		return c, &exitError{code: 2, err: err}
	}
	switch {
	case fs.NArg() > 0:
		return c, usageError("run: unexpected arguments %q", fs.Args())
	case c.CheckProxyHealth:
		return c, nil // the injector's startupProbe: only -admin-addr matters
	case c.ProxyID == "" && c.SidecarFor == "":
		return c, usageError("run: one of -proxy-id or -sidecar-for is required")
	case c.ProxyID != "" && c.SidecarFor != "":
		return c, usageError("run: -proxy-id and -sidecar-for are mutually exclusive")
	}
	return c, validateRunConfig(c)
}

// addRunFlags defines ferry run's own flags on fs (shared with the
// consul-dataplane command line).
func addRunFlags(fs *flag.FlagSet, c *runConfig) {
	fs.StringVar(&c.ProxyID, "proxy-id", os.Getenv("CONNECT_PROXY_ID"), "ID of the proxy's registration with the local agent (env CONNECT_PROXY_ID)")
	fs.StringVar(&c.SidecarFor, "sidecar-for", os.Getenv("CONNECT_SIDECAR_FOR"), "ID of the service whose sidecar this is; finds the one connect-proxy for it (env CONNECT_SIDECAR_FOR)")
	fs.StringVar(&c.HTTPAddr, "http-addr", "", "Consul agent HTTP address (default: env CONSUL_HTTP_ADDR, else 127.0.0.1:8500)")
	fs.StringVar(&c.Token, "token", "", "Consul ACL token (default: env CONSUL_HTTP_TOKEN)")
	fs.StringVar(&c.Inbound, "inbound-addr", "", "inbound listen address (default: 0.0.0.0:<bind_port or proxy port>)")
	fs.StringVar(&c.Outbound, "outbound-addr", "", "outbound listen address (default: 127.0.0.1:<OutboundListenerPort or 15001>); on a loopback address, the other family's loopback ([::1] or 127.0.0.1) at the same port is bound too, where the pod has IPv6")
	fs.StringVar(&c.LocalApp, "local-app", "", "local application address (default: <LocalServiceAddress or 127.0.0.1>:<LocalServicePort>)")
	fs.StringVar(&c.AdminAddr, "admin-addr", "127.0.0.1:19000", "admin HTTP address (/ready, /metrics)")
	fs.IntVar(&c.MaxConnections, "max-connections", defaultMaxConnections, "per-listener cap on established connections; new ones past it are reset (0 = no cap). Inbound connections still in their handshake do not count: they have their own budget (a tenth of the cap, 16 to 256; 32 per source IP, per /64 for IPv6; the oldest is reset past it)")
	fs.IntVar(&c.ProxyUID, "proxy-uid", 5995, "UID the redirect rules exempt (ferry redirect -proxy-uid); ferry warns at start when it runs as another, whose own connections would loop")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", proxy.DefaultConnectTimeout, "upstream and local-app connect timeout")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", proxy.DefaultIdleTimeout, "close a connection after this long without traffic in either direction (0 = never)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 15*time.Second, "on SIGTERM/SIGINT, how long established connections may finish")
	fs.StringVar(&c.LogLevel, "log-level", "info", "trace, debug, info, warn or error")
	fs.BoolVar(&c.Permissive, "permissive", false, "let inbound clients that do not speak TLS through to the app (Consul's permissive MutualTLSMode); default: refuse them")
	fs.DurationVar(&c.HandshakeTimeout, "handshake-timeout", proxy.DefaultHandshakeTimeout, "inbound TLS handshake deadline")
	fs.BoolVar(&c.LiveRevocation, "live-revocation", true, "close established inbound connections whose source an intention change denies")
	fs.BoolVar(&c.Tunnels, "tunnels", true, "between ferry sidecars, carry connections one after another over reused mTLS sessions (negotiated by ALPN; other peers are unaffected)")
	fs.Func("ktls", "kernel TLS on mTLS sessions between ferry sidecars: auto (when the node's kernel has the tls module), off, or required (refuse to start without it, and refuse sessions that cannot use it). Negotiated by ALPN, for tunnel sessions and for one-connection sessions (-tunnels=false); other peers are unaffected (default auto)", func(v string) error {
		m, err := ktls.ParseMode(v)
		if err != nil {
			return err
		}
		c.KTLS = m
		return nil
	})
	fs.Var(&c.VirtualCIDRs, "virtual-cidr", "CIDR in which a service's `virtual` tagged address (its Kubernetes ClusterIP) is honoured, repeatable, e.g. the cluster's service range 10.96.0.0/12 (default: any address)")
	fs.StringVar(&c.DNSAddr, "dns-addr", dns.DefaultAddr, "DNS server address, UDP and TCP (empty disables); on a loopback address, the other family's loopback at the same port is bound too, where the pod has IPv6")
	fs.Var(&c.DNSRecursors, "dns-recursor", "DNS recursor IP[:port] for names outside the mesh, repeatable (default: the nameservers of /etc/resolv.conf except ferry itself: with -dns-addr on loopback or a wildcard, every loopback nameserver, which the DNS redirect sends back to ferry)")
	fs.StringVar(&c.ClusterDomain, "cluster-domain", dns.DefaultClusterDomain, "Kubernetes cluster domain (<svc>.<ns>.svc.<domain> names)")
	fs.StringVar(&c.ConsulDNSAddr, "consul-dns-addr", "", "Consul agent DNS address for .consul names the sidecar does not answer itself (SRV, TXT, ...); default: the recursors")
	fs.StringVar(&c.DefaultPolicy, "default-intention-policy", "", "allow or deny: the decision when no intention matches (default: the agent's default_intention_policy, else its ACL default policy, else deny)")
}

// validateRunConfig checks the values shared by both command lines.
func validateRunConfig(c runConfig) error {
	switch {
	case c.MaxConnections < 0:
		return usageError("run: -max-connections must be >= 0")
	case c.ProxyUID < 0:
		return usageError("run: -proxy-uid must be >= 0")
	case c.ConnectTimeout <= 0:
		return usageError("run: -connect-timeout must be > 0")
	case c.HandshakeTimeout <= 0:
		return usageError("run: -handshake-timeout must be > 0")
	case c.IdleTimeout < 0 || c.DrainTimeout < 0 || c.ShutdownGracePeriod < 0 || c.StartupGracePeriod < 0:
		return usageError("run: timeouts must be >= 0")
	case hclog.LevelFromString(c.LogLevel) == hclog.NoLevel:
		return usageError("run: unknown -log-level %q", c.LogLevel)
	case (c.PromCACertsPath != "" || c.PromCertFile != "" || c.PromKeyFile != "") &&
		(c.PromCACertsPath == "" || c.PromCertFile == "" || c.PromKeyFile == ""):
		// consul-dataplane's own check: half a TLS setup must not
		// quietly serve the metrics in the clear.
		return usageError("run: TLS for the merged metrics needs all of -telemetry-prom-ca-certs-path, -telemetry-prom-cert-file and -telemetry-prom-key-file")
	}
	if _, err := intentions.ParsePolicy(c.DefaultPolicy); err != nil {
		return usageError("run: -default-intention-policy: %v", err)
	}
	return nil
}

// prefixFlag is a repeatable CIDR flag.
type prefixFlag []netip.Prefix

func (l *prefixFlag) String() string {
	if l == nil {
		return ""
	}
	out := make([]string, len(*l))
	for i, p := range *l {
		out[i] = p.String()
	}
	return strings.Join(out, ",")
}

func (l *prefixFlag) Set(v string) error {
	p, err := netip.ParsePrefix(strings.TrimSpace(v))
	if err != nil {
		return fmt.Errorf("not a CIDR: %w", err)
	}
	*l = append(*l, p.Masked())
	return nil
}
