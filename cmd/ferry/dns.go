package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/ferrymesh/ferry/dns"
	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/hashicorp/go-hclog"
)

// resolvConf is where the default recursors come from.
const resolvConf = "/etc/resolv.conf"

// startDNS serves the sidecar's DNS on -dns-addr (unless empty) from the
// catalog view and adds its counters to metrics. It returns nil when DNS
// is disabled.
func startDNS(cfg runConfig, view *catalog.View, metrics *proxy.MetricSet, log hclog.Logger) (*dns.Server, error) {
	if cfg.DNSAddr == "" {
		return nil, nil
	}
	recs := []string(cfg.DNSRecursors)
	if len(recs) == 0 {
		recs = defaultRecursors(resolvConf, cfg.DNSAddr, log)
	}
	srv, err := dns.New(dns.Config{
		Addr:          cfg.DNSAddr,
		ClusterDomain: cfg.ClusterDomain,
		// Datacenter is left empty: the view learns it from the agent
		// after start, and the server asks the view.
		Recursors:     recs,
		ConsulDNS:     cfg.ConsulDNSAddr,
		ConsulDNSMore: cfg.ConsulDNSMore,
		Mesh:          view,
		Logger:        log,
	})
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	if err := srv.Start(context.Background()); err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	if metrics != nil {
		metrics.Register(srv)
	}
	return srv, nil
}

// defaultRecursors are the nameservers of the pod's resolv.conf that are
// not ferry itself. In a redirected pod resolv.conf names 127.0.0.1 (DNATed
// to ferry's DNS) and then, e.g., kube-dns: with ferry on loopback, every
// loopback nameserver is dropped (see dns.RecursorsFromResolvConf).
func defaultRecursors(path, self string, log hclog.Logger) []string {
	recs, err := dns.RecursorsFromResolvConf(path, self)
	switch {
	case err != nil:
		log.Warn("no recursors from resolv.conf; names outside the mesh will fail (set -dns-recursor)", "error", err)
	case len(recs) == 0:
		log.Warn("resolv.conf names no nameserver but ferry itself; names outside the mesh will fail (set -dns-recursor)", "path", path)
	}
	return recs
}

// repeatedFlag is a repeatable string flag.
type repeatedFlag []string

func (l *repeatedFlag) String() string { return strings.Join(*l, ",") }

func (l *repeatedFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}
