package main

import (
	"crypto/tls"
	"fmt"

	"github.com/ferrymesh/ferry/internal/certfile"
	"github.com/hashicorp/go-hclog"
)

// promTLSConfig is the merged metrics listener's TLS (nil without
// -telemetry-prom-cert-file), as consul-dataplane configures Envoy's
// Prometheus listener: the certificate served, and the CA bundle a
// scraper's client certificate is verified against when it gives one.
// Files are read now, so a wrong path fails the start, and re-read when
// they change.
func promTLSConfig(cfg runConfig, log hclog.Logger) (*tls.Config, error) {
	if cfg.PromCertFile == "" {
		return nil, nil
	}
	cert := &certfile.Reloader{CertFile: cfg.PromCertFile, KeyFile: cfg.PromKeyFile, Log: log, What: "merged metrics certificate"}
	if err := cert.Load(); err != nil {
		return nil, fmt.Errorf("merged metrics TLS: %w", err)
	}
	cas := &certfile.CAPool{Path: cfg.PromCACertsPath, Log: log}
	if err := cas.Load(); err != nil {
		return nil, fmt.Errorf("merged metrics TLS: %w", err)
	}
	return certfile.ServerConfig(cert, cas), nil
}
