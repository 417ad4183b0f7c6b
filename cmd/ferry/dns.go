package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/ferrymesh/ferry/dns"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/hashicorp/go-hclog"
)

// startDNS serves the sidecar's DNS on -dns-addr (unless empty) from the
// catalog view; it returns the function that stops it.
func startDNS(cfg runConfig, view *catalog.View, log hclog.Logger) (stop func(), err error) {
	if cfg.DNSAddr == "" {
		return func() {}, nil
	}
	recs := []string(cfg.DNSRecursors)
	if len(recs) == 0 {
		if recs, err = dns.RecursorsFromResolvConf("/etc/resolv.conf", cfg.DNSAddr); err != nil {
			log.Warn("no recursors from /etc/resolv.conf; names outside the mesh will fail", "error", err)
		}
	}
	srv, err := dns.New(dns.Config{
		Addr:          cfg.DNSAddr,
		ClusterDomain: cfg.ClusterDomain,
		Datacenter:    view.Datacenter(),
		Recursors:     recs,
		ConsulDNS:     cfg.ConsulDNSAddr,
		Mesh:          view,
		Logger:        log,
	})
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	if err := srv.Start(context.Background()); err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	log.Info("dns listening", "addr", srv.Addr(), "recursors", recs)
	return func() { srv.Close() }, nil
}

// repeatedFlag is a repeatable string flag.
type repeatedFlag []string

func (l *repeatedFlag) String() string { return strings.Join(*l, ",") }

func (l *repeatedFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}
