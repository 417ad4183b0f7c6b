package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/redirect"
	"github.com/hashicorp/consul/api"
)

const redirectUsage = `Usage: ferry redirect [flags]

Installs the pod's traffic redirection rules (iptables nat table), the same
rules as "consul connect redirect-traffic" and consul-k8s, but idempotent,
atomic (one iptables-restore transaction per address family) and
validated before the kernel is touched.

  ferry redirect -proxy-uid 5995 -proxy-inbound-port 20000
  ferry redirect -proxy-uid 5995 -proxy-id web-sidecar-proxy
  ferry redirect -print -proxy-uid 5995 -proxy-inbound-port 20000   # no root needed
  ferry redirect -cleanup

Inputs, lists in this order: CONSUL_REDIRECT_TRAFFIC_CONFIG (consul-k8s JSON),
the -proxy-id registration, flags, then -annotations. Scalar flags override
the JSON. Every list flag may be repeated and takes comma lists.

Flags:
`

// stringList is a repeatable flag whose values may also be comma lists.
type stringList struct {
	name  string
	items []redirect.Item
}

func (l *stringList) String() string {
	if l == nil {
		return ""
	}
	vs := make([]string, len(l.items))
	for i, it := range l.items {
		vs[i] = it.Value
	}
	return strings.Join(vs, ",")
}

func (l *stringList) Set(v string) error {
	items, err := redirect.SplitList("-"+l.name, v)
	if err != nil {
		return err
	}
	l.items = append(l.items, items...)
	return nil
}

type redirectFlags struct {
	proxyUID, proxyID, nodeName        string
	inboundPort, outboundPort          int
	dnsIP                              string
	dnsPort                            int
	netns, annotations                 string
	cleanup, print, ipv6               bool
	exclIn, exclOut, exclCIDR, exclUID stringList
	set                                map[string]bool // flags given explicitly
	dualStack                          string          // consul-k8s's dual-stack switch that asked for IPv6 rules ("" = none)
	http                               httpFlags
}

// httpFlags are Consul's CLI HTTP flags; unset ones fall back to the
// CONSUL_HTTP_* environment through api.DefaultConfig.
type httpFlags struct {
	addr, token, tokenFile, caFile, caPath, certFile, keyFile, tlsServerName, namespace, partition string
}

func (h *httpFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&h.addr, "http-addr", "", "`address` of the Consul HTTP API (env CONSUL_HTTP_ADDR)")
	fs.StringVar(&h.token, "token", "", "ACL token (env CONSUL_HTTP_TOKEN)")
	fs.StringVar(&h.tokenFile, "token-file", "", "file holding the ACL token (env CONSUL_HTTP_TOKEN_FILE)")
	fs.StringVar(&h.caFile, "ca-file", "", "CA file for TLS to Consul (env CONSUL_CACERT)")
	fs.StringVar(&h.caPath, "ca-path", "", "directory of CA certificates (env CONSUL_CAPATH)")
	fs.StringVar(&h.certFile, "client-cert", "", "client certificate for TLS (env CONSUL_CLIENT_CERT)")
	fs.StringVar(&h.keyFile, "client-key", "", "client key for TLS (env CONSUL_CLIENT_KEY)")
	fs.StringVar(&h.tlsServerName, "tls-server-name", "", "SNI name for TLS (env CONSUL_TLS_SERVER_NAME)")
	fs.StringVar(&h.namespace, "namespace", "", "Consul namespace (Enterprise)")
	fs.StringVar(&h.partition, "partition", "", "Consul admin partition (Enterprise)")
}

// client makes the Consul client; dial, when set, makes its TCP
// connections.
func (h *httpFlags) client(dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*api.Client, error) {
	c := api.DefaultConfig()
	if dial != nil && c.Transport != nil {
		c.Transport.DialContext = dial
	}
	merge := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	merge(&c.Address, h.addr)
	merge(&c.Token, h.token)
	merge(&c.TokenFile, h.tokenFile)
	merge(&c.TLSConfig.CAFile, h.caFile)
	merge(&c.TLSConfig.CAPath, h.caPath)
	merge(&c.TLSConfig.CertFile, h.certFile)
	merge(&c.TLSConfig.KeyFile, h.keyFile)
	merge(&c.TLSConfig.Address, h.tlsServerName)
	merge(&c.Namespace, h.namespace)
	merge(&c.Partition, h.partition)
	return api.NewClient(c)
}

func newRedirectFlagSet(f *redirectFlags, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("redirect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, redirectUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&f.proxyUID, "proxy-uid", "", "user ID of the proxy, whose traffic is not redirected (required; one UID, not a range)")
	fs.StringVar(&f.proxyID, "proxy-id", "", "service ID of the proxy registration to read ports and exclusions from")
	fs.StringVar(&f.nodeName, "node-name", "", "with -proxy-id: read the registration from this catalog node instead of the local agent")
	fs.IntVar(&f.inboundPort, "proxy-inbound-port", 0, "inbound port the proxy listens on")
	fs.IntVar(&f.outboundPort, "proxy-outbound-port", redirect.DefaultOutboundPort, "outbound port the proxy listens on")
	fs.Var(&f.exclIn, "exclude-inbound-port", "inbound port (number, lo:hi range or service name) not to redirect; repeatable")
	fs.Var(&f.exclOut, "exclude-outbound-port", "outbound port (number, lo:hi range or service name) not to redirect; repeatable")
	fs.Var(&f.exclCIDR, "exclude-outbound-cidr", "outbound destination address or CIDR not to redirect; repeatable")
	fs.Var(&f.exclUID, "exclude-uid", "extra user ID (or lo-hi range) whose traffic is not redirected; repeatable")
	fs.StringVar(&f.dnsIP, "consul-dns-ip", "", "IP of Consul DNS: DNS queries are redirected there")
	fs.IntVar(&f.dnsPort, "consul-dns-port", 0, "port of Consul DNS: queries to -consul-dns-ip (default loopback) port 53 go there")
	fs.StringVar(&f.netns, "netns", "", "`path` of the network namespace to install the rules in, e.g. /var/run/netns/foo")
	fs.StringVar(&f.annotations, "annotations", "", "Kubernetes downward-API annotations `file`; its transparent-proxy annotations are applied on top of the flags")
	fs.BoolVar(&f.cleanup, "cleanup", false, "remove ferry's (and Consul's) chains and the jumps into them, nothing else")
	fs.BoolVar(&f.print, "print", false, "print the rules in iptables-restore format and exit; touches nothing, needs no root")
	fs.BoolVar(&f.ipv6, "ipv6", false, "also install the rules with ip6tables (default: whenever the namespace has IPv6 on an interface other than loopback, link-local included, or consul-k8s's dual-stack switch, env CONSUL_DUAL_STACK or annotation consul.hashicorp.com/dual-stack, is true; -ipv6=false opts out)")
	f.exclIn.name, f.exclOut.name, f.exclCIDR.name, f.exclUID.name =
		"exclude-inbound-port", "exclude-outbound-port", "exclude-outbound-cidr", "exclude-uid"
	f.http.register(fs)
	return fs
}

func runRedirect(args []string, stdout, stderr io.Writer) error {
	var f redirectFlags
	fs := newRedirectFlagSet(&f, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &exitError{code: 0, err: errHelp}
		}
		return &exitError{code: 2, err: err}
	}
	if fs.NArg() > 0 {
		return usageError("redirect: unexpected arguments %q", fs.Args())
	}
	f.set = map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { f.set[fl.Name] = true })

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if f.cleanup {
		return redirectCleanup(ctx, &f, stdout)
	}

	cfg, netns, enabled, err := redirectConfig(ctx, &f)
	if err != nil {
		return err
	}
	if !enabled {
		fmt.Fprintf(stdout, "transparent proxy is disabled by annotation %s; no rules installed\n", redirect.AnnotationTransparentProxy)
		return nil
	}
	spec, err := cfg.Validate()
	if err != nil {
		return usageError("redirect: %v", err)
	}

	if f.print {
		families := []redirect.Family{redirect.IPv4}
		if f.ipv6 || (!f.set["ipv6"] && f.dualStack != "") {
			families = append(families, redirect.IPv6)
		}
		plans, err := redirect.Build(spec, families...)
		if err != nil {
			return usageError("redirect: %v", err)
		}
		for _, p := range plans {
			fmt.Fprintf(stdout, "# ferry redirect: %s rules for %s-restore --noflush\n", p.Family, p.Family.Command())
			fmt.Fprint(stdout, p.Restore())
		}
		return nil
	}

	var results []redirect.Result
	var planErr error
	err = redirect.InNetNS(netns, func() error {
		families := []redirect.Family{redirect.IPv4}
		v6, why := f.ipv6, "-ipv6"
		if !f.set["ipv6"] && f.dualStack != "" {
			v6, why = true, f.dualStack
		} else if !f.set["ipv6"] {
			// Whenever the namespace has IPv6 at all, even link-local
			// only: otherwise IPv6 would reach the app unredirected.
			var err error
			if v6, why, err = redirect.IPv6Enabled(); err != nil {
				return err
			}
		}
		if v6 {
			families = append(families, redirect.IPv6)
		}
		plans, err := redirect.Build(spec, families...)
		if err != nil {
			planErr = err
			return nil
		}
		backends := map[redirect.Family]redirect.Backend{}
		for _, fam := range families {
			be, err := redirect.NewExecBackend(fam)
			if err != nil && fam == redirect.IPv6 {
				// Before anything is touched: IPv4 rules alone would leave
				// IPv6 open to the app.
				return fmt.Errorf("%w (IPv6 rules are needed: %s; -ipv6=false installs IPv4 rules only and leaves IPv6 traffic unredirected)", err, why)
			}
			if err != nil {
				return err
			}
			backends[fam] = be
		}
		results, err = redirect.Apply(ctx, plans, backends)
		return err
	})
	if planErr != nil {
		return usageError("redirect: %v", planErr)
	}
	if err != nil {
		return err
	}
	for _, r := range results {
		if r.Changed {
			fmt.Fprintf(stdout, "%s traffic redirection rules installed\n", r.Family)
		} else {
			fmt.Fprintf(stdout, "%s traffic redirection rules already in place; nothing changed\n", r.Family)
		}
	}
	return nil
}

// redirectConfig merges the inputs into one Config: the consul-k8s JSON,
// then the -proxy-id registration, then flags, then annotations. Errors are
// usage errors except for failing to reach Consul.
func redirectConfig(ctx context.Context, f *redirectFlags) (cfg redirect.Config, netns string, enabled bool, err error) {
	if js := os.Getenv(redirect.EnvRedirectConfig); js != "" {
		cfg, netns, err = redirect.ParseConsulJSON([]byte(js))
		if err != nil {
			return cfg, "", false, usageError("redirect: %v", err)
		}
	}
	if f.set["netns"] {
		netns = f.netns
	}
	if f.set["proxy-uid"] || cfg.ProxyUserID.Value == "" {
		cfg.ProxyUserID = redirect.Item{Value: f.proxyUID, Source: "-proxy-uid"}
	}
	if strings.TrimSpace(cfg.ProxyUserID.Value) == "" {
		return cfg, "", false, usageError("redirect: -proxy-uid is required")
	}
	if f.proxyID != "" {
		if f.set["proxy-inbound-port"] || f.set["proxy-outbound-port"] {
			return cfg, "", false, usageError("redirect: -proxy-inbound-port or -proxy-outbound-port cannot be given together with -proxy-id: the proxy's ports come from its registration")
		}
	} else if f.nodeName != "" {
		return cfg, "", false, usageError("redirect: -node-name requires -proxy-id")
	}
	if f.set["proxy-inbound-port"] || (cfg.ProxyInboundPort.Value == "" && f.proxyID == "") {
		cfg.ProxyInboundPort = intItem(f.inboundPort, "-proxy-inbound-port")
	}
	if f.set["proxy-outbound-port"] || cfg.ProxyOutboundPort.Value == "" {
		cfg.ProxyOutboundPort = intItem(f.outboundPort, "-proxy-outbound-port")
	}
	if f.proxyID == "" && cfg.ProxyInboundPort.Value == "" {
		return cfg, "", false, usageError("redirect: either -proxy-id or -proxy-inbound-port is required")
	}
	if f.set["consul-dns-ip"] {
		cfg.ConsulDNSIP = redirect.Item{Value: f.dnsIP, Source: "-consul-dns-ip"}
	}
	if f.set["consul-dns-port"] {
		cfg.ConsulDNSPort = intItem(f.dnsPort, "-consul-dns-port")
	}

	if f.proxyID != "" {
		// The lookup runs before the rules are (re)installed, but on a
		// second run in the same namespace (an init container after a pod
		// restart) the first run's rules are in force and would redirect
		// the connection to the agent to the proxy's outbound port. Dial
		// as the proxy UID, which the rules exempt (redirect.DialAsUID).
		uid, err := (redirect.Config{ProxyUserID: cfg.ProxyUserID, ProxyInboundPort: redirect.Item{Value: "1"}}).Validate()
		if err != nil {
			return cfg, "", false, usageError("redirect: %v", err)
		}
		exemptUID, err := strconv.ParseUint(uid.ProxyUID, 10, 32)
		if err != nil {
			return cfg, "", false, usageError("redirect: -proxy-uid %q: %v", uid.ProxyUID, err)
		}
		client, err := f.http.client(redirect.DialAsUID(uint32(exemptUID), &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}))
		if err != nil {
			return cfg, "", false, usageError("redirect: Consul client: %v", err)
		}
		ps, err := redirect.LookupProxy(ctx, client, f.proxyID, f.nodeName)
		if err != nil {
			return cfg, "", false, fmt.Errorf("redirect: %w", err)
		}
		cfg.ProxyInboundPort = ps.InboundPort
		cfg.ProxyOutboundPort = ps.OutboundPort
		cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, ps.ExcludeInboundPorts...)
	}

	cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, f.exclIn.items...)
	cfg.ExcludeOutboundPorts = append(cfg.ExcludeOutboundPorts, f.exclOut.items...)
	cfg.ExcludeOutboundCIDRs = append(cfg.ExcludeOutboundCIDRs, f.exclCIDR.items...)
	cfg.ExcludeUIDs = append(cfg.ExcludeUIDs, f.exclUID.items...)

	enabled = true
	var ann map[string]string
	if f.annotations != "" {
		file, err := os.Open(f.annotations)
		if err != nil {
			return cfg, "", false, usageError("redirect: -annotations: %v", err)
		}
		ann, err = redirect.ParseAnnotations(file)
		file.Close()
		if err != nil {
			return cfg, "", false, usageError("redirect: -annotations %s: %v", f.annotations, err)
		}
		enabled, err = redirect.ApplyAnnotations(&cfg, ann)
		if err != nil {
			return cfg, "", false, usageError("redirect: %v", err)
		}
	}
	on, set, source, err := redirect.DualStack(os.Getenv(redirect.EnvDualStack), ann)
	if err != nil {
		return cfg, "", false, usageError("redirect: %v", err)
	}
	if set && on {
		f.dualStack = source + "=true"
	}
	return cfg, netns, enabled, nil
}

func intItem(v int, source string) redirect.Item {
	if v == 0 {
		return redirect.Item{Source: source}
	}
	return redirect.Item{Value: strconv.Itoa(v), Source: source}
}

func redirectCleanup(ctx context.Context, f *redirectFlags, stdout io.Writer) error {
	netns := f.netns
	if !f.set["netns"] {
		if js := os.Getenv(redirect.EnvRedirectConfig); js != "" {
			if _, ns, err := redirect.ParseConsulJSON([]byte(js)); err == nil {
				netns = ns
			}
		}
	}
	var results []redirect.Result
	err := redirect.InNetNS(netns, func() error {
		backends := map[redirect.Family]redirect.Backend{}
		be4, err := redirect.NewExecBackend(redirect.IPv4)
		if err != nil {
			return err
		}
		backends[redirect.IPv4] = be4
		if !f.set["ipv6"] || f.ipv6 {
			// Without -ipv6, a host whose ip6tables cannot even list the
			// nat table (no binary, no ip6table_nat) has no IPv6 rules of
			// ours to remove: skip it rather than fail the cleanup.
			be6, err := redirect.NewExecBackend(redirect.IPv6)
			if err == nil && !f.ipv6 {
				_, err = be6.List(ctx)
			}
			switch {
			case err == nil:
				backends[redirect.IPv6] = be6
			case f.ipv6:
				return err
			}
		}
		results, err = redirect.Cleanup(ctx, backends)
		return err
	})
	for _, r := range results {
		if r.Changed {
			fmt.Fprintf(stdout, "%s traffic redirection rules removed\n", r.Family)
		} else {
			fmt.Fprintf(stdout, "%s: no traffic redirection rules to remove\n", r.Family)
		}
	}
	return err
}
