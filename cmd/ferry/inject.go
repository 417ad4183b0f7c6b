package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/ferrymesh/ferry/inject"
	"github.com/ferrymesh/ferry/internal/certfile"
	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
)

const injectUsage = `Usage: ferry inject [flags] [file ...]
       ferry inject -webhook -tls-cert-file tls.crt -tls-key-file tls.key [flags]

Injects ferry into Kubernetes manifests the way consul-k8s's webhook injects
consul-dataplane: the ferry redirect init container, the ferry sidecar
(consul-dataplane's arguments), rewritten HTTP probes, Consul DNS, upstream
environment variables. Reads multi-document YAML or JSON (Pod, Deployment,
StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
List) from the files or stdin and writes it to stdout; other objects and
pods that need no injection pass through unchanged. consul-k8s's pod
annotations apply (consul.hashicorp.com/connect-inject: "true" and the
rest). Injecting an injected manifest changes nothing.

  ferry inject -cluster-dns 10.96.0.10 deploy.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | ferry inject -cluster-dns 10.96.0.10 | kubectl apply -f -

With -webhook it serves the same injection as a mutating admission webhook
(AdmissionReview v1, JSON patch) on https://<listen>/mutate, reloading the
certificate files when they change; deploy/ferry-inject.yaml deploys it.

Flags:
`

type injectFlags struct {
	cfg                       inject.Config
	webhook                   bool
	listen, certFile, keyFile string
	kubeServer, kubeToken     string
	kubeCA, resolvConf        string
	clusterDNS                repeatedFlag
	clusterDomain             string
	nsLabels                  repeatedFlag
	defaultInject, quiet      bool
	logLevel                  string
	sidecarCommand            string
	initCommand               string
}

func newInjectFlagSet(f *injectFlags, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("inject", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, injectUsage)
		fs.PrintDefaults()
	}
	c := &f.cfg
	*c = inject.DefaultConfig()
	fs.BoolVar(&f.webhook, "webhook", false, "serve the admission webhook instead of reading manifests")
	fs.StringVar(&f.listen, "listen", ":8443", "webhook: `address` to serve HTTPS on")
	fs.StringVar(&f.certFile, "tls-cert-file", "", "webhook: serving certificate `file` (PEM), reloaded when it changes")
	fs.StringVar(&f.keyFile, "tls-key-file", "", "webhook: serving key `file` (PEM), reloaded when it changes")
	fs.StringVar(&f.kubeServer, "kube-server", "", "webhook: API server URL for namespace labels (default: in-cluster)")
	fs.StringVar(&f.kubeToken, "kube-token-file", inject.InClusterTokenFile, "webhook: bearer token `file` for the API server")
	fs.StringVar(&f.kubeCA, "kube-ca-file", inject.InClusterCAFile, "webhook: CA `file` of the API server")
	fs.StringVar(&f.resolvConf, "resolv-conf", "", "resolv.conf whose servers, searches and options pods keep after Consul DNS (default: /etc/resolv.conf with -webhook, as consul-k8s does; none for manifests)")
	fs.Var(&f.clusterDNS, "cluster-dns", "manifests: the cluster DNS Service `IP` pods fall back to after Consul DNS (kubectl -n kube-system get svc kube-dns); repeatable")
	fs.StringVar(&f.clusterDomain, "cluster-domain", "cluster.local", "manifests: cluster domain for the DNS search list")
	fs.Var(&f.nsLabels, "namespace-label", "manifests: `key=value` label of the objects' namespaces (transparent-proxy, consul-dns defaults); repeatable")
	fs.BoolVar(&f.quiet, "quiet", false, "manifests: do not report each object on stderr")
	fs.StringVar(&f.logLevel, "log-level", "info", "webhook: trace, debug, info, warn or error")

	fs.StringVar(&c.SidecarImage, "sidecar-image", c.SidecarImage, "ferry sidecar image")
	fs.StringVar(&c.InitImage, "init-image", c.InitImage, "ferry init image (ferry redirect and iptables)")
	f.sidecarCommand = strings.Join(c.SidecarCommand, " ")
	f.initCommand = strings.Join(c.InitCommand, " ")
	fs.StringVar(&f.sidecarCommand, "sidecar-command", f.sidecarCommand, "sidecar command, space-separated; consul-dataplane's arguments follow")
	fs.StringVar(&f.initCommand, "init-command", f.initCommand, "init container command, space-separated")
	fs.StringVar(&c.ConsulAddresses, "consul-addresses", c.ConsulAddresses, "Consul servers for the sidecar (-addresses: DNS name or exec=<cmd>)")
	fs.IntVar(&c.GRPCPort, "consul-grpc-port", c.GRPCPort, "Consul servers' gRPC port")
	fs.BoolVar(&c.TLS, "consul-tls", c.TLS, "the sidecar talks TLS to Consul (else -tls-disabled)")
	fs.StringVar(&c.TLSServerName, "consul-tls-server-name", "", "with -consul-tls: server name to verify")
	fs.StringVar(&c.CACertsPath, "consul-ca-certs", "", "with -consul-tls: CA file path inside the sidecar (mount it with the consul-sidecar-user-volume annotations)")
	fs.StringVar(&c.AuthMethod, "acl-auth-method", "", "Consul ACL auth method the sidecar logs in with (empty: no ACL login)")
	fs.StringVar(&c.LogLevel, "sidecar-log-level", c.LogLevel, "sidecar log level")
	fs.BoolVar(&c.LogJSON, "sidecar-log-json", false, "sidecar logs JSON")
	fs.BoolVar(&c.SkipServerWatch, "skip-server-watch", false, "sidecar: -server-watch-disabled (servers behind a load balancer)")
	fs.StringVar(&c.ReleaseNamespace, "release-namespace", c.ReleaseNamespace, "Consul's namespace (its search domain in the resolv.conf is replaced by the pod's)")
	fs.BoolVar(&f.defaultInject, "default-inject", false, "inject pods without the connect-inject annotation too")
	fs.BoolVar(&c.CNI, "cni", false, "a CNI plugin (ferry-cni) installs the redirect rules: no init container, rules in the redirect-traffic-config annotation")
	fs.BoolVar(&c.DefaultTransparentProxy, "default-transparent-proxy", c.DefaultTransparentProxy, "transparent proxy unless the pod or namespace says otherwise")
	fs.BoolVar(&c.DefaultOverwriteProbes, "default-overwrite-probes", c.DefaultOverwriteProbes, "rewrite HTTP probes to the expose ports")
	fs.BoolVar(&c.DefaultConsulDNS, "default-consul-dns", c.DefaultConsulDNS, "redirect DNS to the sidecar's Consul DNS")
	fs.BoolVar(&c.DefaultLifecycle, "default-lifecycle", c.DefaultLifecycle, "sidecar first in the pod, with graceful startup and shutdown")
	fs.BoolVar(&c.DefaultNativeSidecar, "default-native-sidecar", false, "the sidecar as a native sidecar (init container, restartPolicy Always)")
	fs.BoolVar(&c.DefaultEnableMetrics, "default-enable-metrics", false, "Prometheus metrics on the scrape port")
	fs.BoolVar(&c.DefaultEnableMetricsMerging, "default-enable-metrics-merging", false, "merge the app's metrics into the sidecar's")
	return fs
}

func runInject(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var f injectFlags
	fs := newInjectFlagSet(&f, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &exitError{code: 0, err: errHelp}
		}
		return &exitError{code: 2, err: err}
	}
	cfg := f.cfg
	cfg.RequireAnnotation = !f.defaultInject
	cfg.SidecarCommand = strings.Fields(f.sidecarCommand)
	cfg.InitCommand = strings.Fields(f.initCommand)
	if len(cfg.SidecarCommand) == 0 || len(cfg.InitCommand) == 0 {
		return usageError("inject: -sidecar-command and -init-command must not be empty")
	}
	resolv := f.resolvConf
	if resolv == "" && f.webhook {
		resolv = "/etc/resolv.conf"
	}
	if resolv != "" {
		rc, err := dns.ClientConfigFromFile(resolv)
		if err != nil {
			return usageError("inject: -resolv-conf: %v", err)
		}
		cfg.DNS = inject.DNSConfig{Nameservers: rc.Servers, Searches: rc.Search, Ndots: rc.Ndots, Timeout: rc.Timeout, Attempts: rc.Attempts}
	}
	if len(f.clusterDNS) > 0 {
		if f.webhook || f.resolvConf != "" {
			return usageError("inject: -cluster-dns is for manifests without -resolv-conf")
		}
		for _, ip := range f.clusterDNS {
			if net.ParseIP(ip) == nil {
				return usageError("inject: -cluster-dns %q is not an IP address", ip)
			}
		}
		d := f.clusterDomain
		// What a ClusterFirst pod's resolv.conf holds; the release
		// namespace's search domain becomes the pod's.
		cfg.DNS = inject.DNSConfig{Nameservers: f.clusterDNS,
			Searches: []string{cfg.ReleaseNamespace + ".svc." + d, "svc." + d, d}, Ndots: 5, Timeout: 5, Attempts: 2}
	}
	if f.webhook {
		if fs.NArg() > 0 {
			return usageError("inject: -webhook takes no files")
		}
		return runInjectWebhook(&f, cfg, stderr)
	}
	labels := map[string]string{}
	for _, kv := range f.nsLabels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return usageError("inject: -namespace-label %q is not key=value", kv)
		}
		labels[k] = v
	}
	var in io.Reader = stdin
	if fs.NArg() > 0 {
		var buf bytes.Buffer
		for i, name := range fs.Args() {
			var b []byte
			var err error
			if name == "-" {
				b, err = io.ReadAll(stdin)
			} else {
				b, err = os.ReadFile(name)
			}
			if err != nil {
				return fmt.Errorf("inject: %w", err)
			}
			if i > 0 {
				buf.WriteString("\n---\n")
			}
			buf.Write(b)
		}
		in = &buf
	}
	outcomes, err := inject.Manifest(cfg, func(string) map[string]string { return labels }, in, stdout)
	if err != nil {
		return fmt.Errorf("inject: %w", err)
	}
	if !f.quiet {
		for _, o := range outcomes {
			fmt.Fprintln(stderr, "ferry inject:", o)
		}
	}
	return nil
}

func runInjectWebhook(f *injectFlags, cfg inject.Config, stderr io.Writer) error {
	if f.certFile == "" || f.keyFile == "" {
		return usageError("inject: -webhook needs -tls-cert-file and -tls-key-file")
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "ferry-inject", Level: hclog.LevelFromString(f.logLevel), Output: stderr})
	server := f.kubeServer
	if server == "" {
		server = inject.InClusterServer()
	}
	if server == "" {
		return usageError("inject: -webhook needs -kube-server outside a cluster (namespace labels are read from the API server)")
	}
	nsLabels, err := inject.KubeNamespaces(server, f.kubeToken, f.kubeCA)
	if err != nil {
		return usageError("%v", err)
	}
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("inject: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.Info("serving the admission webhook", "addr", ln.Addr().String(), "path", "/mutate")
	w := &inject.Webhook{Config: cfg, Namespaces: nsLabels, Log: log}
	return w.Serve(ctx, ln, &certfile.Reloader{CertFile: f.certFile, KeyFile: f.keyFile, Log: log, What: "webhook certificate"})
}
