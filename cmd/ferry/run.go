package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/dns"
	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/consulguard"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

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
	// Agentless, when set, talks to Consul servers instead of a local
	// agent (the consul-dataplane command line, dataplane.go).
	Agentless *agentlessConfig

	// kernelTLS is -ktls as decided at start (decideKTLS).
	kernelTLS proxy.KTLS
}

// decideKTLS runs the start-up kernel TLS check for -ktls and says once
// what it found. -ktls=required fails here when the kernel cannot.
func decideKTLS(ctx context.Context, cfg runConfig, log hclog.Logger) (proxy.KTLS, error) {
	use, reason, err := ktls.Decide(ctx, cfg.KTLS)
	if err != nil {
		return proxy.KTLS{}, err
	}
	switch {
	case !use:
		log.Info("kernel TLS not used: mTLS sessions stay in user space", "ktls", cfg.KTLS, "reason", reason)
	case cfg.Tunnels:
		log.Info("kernel TLS available: tunnel sessions offered to and accepted from ferry peers", "ktls", cfg.KTLS)
	default:
		log.Info("kernel TLS available: offered to and accepted from ferry peers", "ktls", cfg.KTLS)
	}
	return proxy.KTLS{Use: use, Required: cfg.KTLS == ktls.Required}, nil
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
	}
	if _, err := intentions.ParsePolicy(c.DefaultPolicy); err != nil {
		return usageError("run: -default-intention-policy: %v", err)
	}
	return nil
}

func runRun(args []string, stdout, stderr io.Writer) error {
	if dataplaneArgs(args) {
		// The injector runs `/ferry run` with consul-dataplane's arguments.
		return runDataplane(args, stdout, stderr)
	}
	cfg, err := parseRunFlags(args, stderr)
	if err != nil {
		return err
	}
	if cfg.CheckProxyHealth {
		return checkProxyHealth(cfg.AdminAddr)
	}
	return startRun(cfg, stderr)
}

// startRun runs the sidecar configured by either command line until a
// signal.
func startRun(cfg runConfig, stderr io.Writer) error {
	log := hclog.New(&hclog.LoggerOptions{Name: "ferry", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr,
		JSONFormat: cfg.LogJSON})
	if uid := os.Getuid(); uid != cfg.ProxyUID {
		log.Warn("ferry runs as a UID other than -proxy-uid: unless the redirect rules exempt this UID, its own connections loop back to it (they are reset as outcome loop)",
			"uid", uid, "proxy_uid", cfg.ProxyUID)
	}

	kt, err := decideKTLS(context.Background(), cfg, log)
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	cfg.kernelTLS = kt

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	return runProxy(cfg, log, sigs)
}

// runProxy runs the sidecar until the first signal, then drains until the
// drain timeout or a second signal.
func runProxy(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal) error {
	var (
		client *api.Client
		reg    proxy.Registration
		id     string
		late   *lateAdmin
		lc     = newLifecycle()
	)
	if cfg.Agentless != nil {
		// Agentless: the admin listener comes first, so that /ready says
		// why ferry cannot log in or reach a server while it retries.
		srv, err := newServerConn(cfg.Agentless, log)
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		late = &lateAdmin{pre: srv.readyErr, extra: srv}
		admin, err := proxy.StartAdmin(cfg.AdminAddr, lc.admin(proxy.AdminHandler(late.Ready, late)), log.Named("admin"))
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		defer admin.Close()
		log.Info("admin listening", "addr", admin.Addr())
		// The lifecycle listener too: a native sidecar's startup hook
		// sees "not ready" rather than a refused connection, and
		// /graceful_shutdown ends a login that does not succeed.
		lca, err := lc.start(cfg, late.Ready, log.Named("lifecycle"))
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		if lca != nil {
			defer lca.Close()
		}
		defer srv.close(log)
		if !srv.start(sigs, lc, log) {
			return nil
		}
		client = srv.client
		reg = srv.registration()
		if cfg.ConsulDNSAddr == "" {
			cfg.ConsulDNSMore = srv.dnsAddrs()
		}
		id = srv.proxyID
	} else {
		var err error
		client, id, err = agentClient(cfg, log, sigs)
		if err != nil || client == nil {
			return err
		}
		reg = proxy.AgentRegistration{Agent: client.Agent(), ID: id}
	}
	return serve(cfg, log, sigs, client, reg, id, late, lc)
}

// agentClient is the local agent's client and the proxy's ID (nil client:
// a signal came first).
func agentClient(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal) (*api.Client, string, error) {
	acfg := api.DefaultConfig() // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
	if cfg.HTTPAddr != "" {
		acfg.Address = cfg.HTTPAddr
	}
	if cfg.Token != "" {
		acfg.Token = cfg.Token
	}
	// Bounded answers (proxy/consulguard): a broken agent's huge, endless
	// or never-sent answer must not grow ferry's memory or freeze a watch.
	// (A unix:// address gets consul/api's own client, unguarded.)
	hc, err := api.NewHttpClient(acfg.Transport, acfg.TLSConfig)
	if err != nil {
		return nil, "", fmt.Errorf("run: consul client: %w", err)
	}
	hc.Transport = consulguard.New(hc.Transport, consulguard.Config{})
	acfg.HttpClient = hc
	client, err := api.NewClient(acfg)
	if err != nil {
		return nil, "", fmt.Errorf("run: consul client: %w", err)
	}
	id := cfg.ProxyID
	if id == "" {
		// The sidecar may be registered after the proxy starts (k8s
		// ordering), so keep looking until a signal.
		for {
			id, err = proxy.FindSidecar(client.Agent(), cfg.SidecarFor)
			if err == nil {
				break
			}
			log.Warn("looking for the sidecar registration", "error", err)
			select {
			case <-sigs:
				return nil, "", nil
			case <-time.After(2 * time.Second):
			}
		}
	}
	return client, id, nil
}

// serve runs the sidecar for reg until a signal, then drains. late, when
// set, is the admin listener already up (agentless); otherwise serve
// starts it.
func serve(cfg runConfig, log hclog.Logger, sigs <-chan os.Signal, client *api.Client, reg proxy.Registration, id string, late *lateAdmin, lc *lifecycle) error {
	log = log.With("proxy_id", id)

	sc, err := proxy.StartSidecar(proxy.SidecarConfig{
		Client:       client,
		ProxyID:      id,
		Registration: reg,
		Overrides:    proxy.Endpoints{Inbound: cfg.Inbound, Outbound: cfg.Outbound, LocalApp: cfg.LocalApp},
		Proxy: proxy.Config{
			Logger:         log.Named("proxy"),
			ConnectTimeout: cfg.ConnectTimeout,
			IdleTimeout:    idleOrDisabled(cfg.IdleTimeout),
			MaxConnections: cfg.MaxConnections,
		},
		Permissive:        cfg.Permissive,
		HandshakeTimeout:  cfg.HandshakeTimeout,
		DisableRevocation: !cfg.LiveRevocation,
		DisableTunnels:    !cfg.Tunnels,
		KTLS:              cfg.kernelTLS,
		VirtualCIDRs:      cfg.VirtualCIDRs,
		// Checked in parseRunFlags.
		DefaultIntentionPolicy: intentions.Policy(cfg.DefaultPolicy),
		PromScrapePath:         cfg.PromScrapePath,
		PromServiceMetricsURL:  cfg.PromServiceMetricsURL,
	})
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	p := sc.Proxy()
	// DNS before admin: once /ready answers 200, names resolve.
	dnsSrv, err := startDNS(cfg, sc.View(), p.Metrics().Set, log)
	if err != nil {
		sc.Shutdown(canceledContext())
		return fmt.Errorf("run: %w", err)
	}
	if dnsSrv != nil {
		defer dnsSrv.Close()
	}
	if late != nil {
		late.set(p)
	} else {
		admin, err := proxy.StartAdmin(cfg.AdminAddr, lc.admin(proxy.AdminHandler(p.Ready, p.Metrics().Set)), log.Named("admin"))
		if err != nil {
			sc.Shutdown(canceledContext())
			return fmt.Errorf("run: %w", err)
		}
		defer admin.Close()
		log.Info("admin listening", "addr", admin.Addr())
	}

	lca, err := lc.start(cfg, p.Ready, log.Named("lifecycle"))
	if err != nil {
		sc.Shutdown(canceledContext())
		return fmt.Errorf("run: %w", err)
	}
	if lca != nil {
		defer lca.Close()
	}

	var runErr error
	graceful := false
	select {
	case sig := <-sigs:
		log.Info("signal received, shutting down", "signal", sig, "grace_period", cfg.ShutdownGracePeriod, "drain_timeout", cfg.DrainTimeout)
		graceful = true
	case <-lc.shutdown:
		log.Info("graceful shutdown requested", "grace_period", cfg.ShutdownGracePeriod, "drain_timeout", cfg.DrainTimeout)
		graceful = true
	case <-lc.quit:
		log.Info("quitquitquit: exiting now")
		sc.Shutdown(canceledContext())
		return nil
	case runErr = <-sc.Fatal():
		log.Error("cannot serve the proxy registration", "error", runErr)
	}
	if graceful && cfg.ShutdownGracePeriod > 0 {
		// Inbound stops taking connections; outbound keeps serving so
		// that the app can finish its work through the mesh.
		p.DrainInbound()
		select {
		case <-time.After(cfg.ShutdownGracePeriod):
		case sig := <-sigs:
			log.Warn("second signal, ending the grace period", "signal", sig)
		case <-lc.quit:
			log.Info("quitquitquit: exiting now")
			sc.Shutdown(canceledContext())
			return nil
		}
	}

	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	go func() {
		select {
		case sig := <-sigs:
			log.Warn("second signal, closing now", "signal", sig)
			cancel()
		case <-dctx.Done():
		}
	}()
	if err := sc.Shutdown(dctx); err != nil {
		log.Warn("shutdown", "error", err)
	}
	log.Info("stopped")
	if runErr != nil {
		return fmt.Errorf("run: %w", runErr)
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

func canceledContext() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// idleOrDisabled maps the flag's "0 = never" to proxy.Config's "< 0 = never".
func idleOrDisabled(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// dataplaneArgs reports whether args are consul-dataplane's command line
// (-addresses, which ferry run's own flags do not have).
func dataplaneArgs(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		name := strings.TrimLeft(a, "-")
		if i := strings.IndexByte(name, '='); i >= 0 {
			name = name[:i]
		}
		if strings.HasPrefix(a, "-") && name == "addresses" {
			return true
		}
	}
	return false
}
