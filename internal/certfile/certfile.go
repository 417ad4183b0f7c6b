// Package certfile serves TLS material kept in files that change under a
// running process: a certificate pair and a CA bundle (one PEM file or a
// directory of them), re-read when the files change. cert-manager and the
// kubelet's secret volumes replace such files in place; a server that
// read them once would keep serving an expired certificate.
package certfile

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Reloader serves the certificate in CertFile and KeyFile, reloading them
// when either file changes. A pair that fails to load keeps the previous
// one in service.
type Reloader struct {
	CertFile, KeyFile string
	Log               hclog.Logger
	// What names the pair in errors and logs ("webhook certificate").
	What string

	mu   sync.Mutex
	cert *tls.Certificate
	seen [2]stamp
}

type stamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return stamp{}, err
	}
	return stamp{fi.ModTime(), fi.Size()}, nil
}

func (c *Reloader) what() string {
	if c.What == "" {
		return "certificate"
	}
	return c.What
}

// Load (re)reads the pair now; the first call must succeed.
func (c *Reloader) Load() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loadLocked()
}

func (c *Reloader) loadLocked() error {
	sc, err1 := stampOf(c.CertFile)
	sk, err2 := stampOf(c.KeyFile)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("%s: %w", c.what(), err)
	}
	if c.cert != nil && c.seen == [2]stamp{sc, sk} {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return fmt.Errorf("%s: %w", c.what(), err)
	}
	if c.cert != nil && c.Log != nil {
		c.Log.Info(c.what()+" reloaded", "cert", c.CertFile)
	}
	c.cert, c.seen = &cert, [2]stamp{sc, sk}
	return nil
}

// GetCertificate is for tls.Config: it checks the files on each handshake
// (two stats) and reloads them when they changed.
func (c *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.loadLocked(); err != nil {
		if c.cert == nil {
			return nil, err
		}
		if c.Log != nil {
			c.Log.Warn("keeping the previous "+c.what(), "error", err)
		}
	}
	return c.cert, nil
}

// CAPool serves the CA certificates in Path (a PEM file, or a directory
// whose regular files are all read, as Consul's and consul-dataplane's CA
// path options), reloading them when the file or directory changes. A
// bundle that fails to load keeps the previous one.
type CAPool struct {
	Path string
	Log  hclog.Logger

	mu   sync.Mutex
	pool *x509.CertPool
	seen []stamp
}

// Load (re)reads the bundle now; the first call must succeed.
func (p *CAPool) Load() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.loadLocked()
}

// Pool returns the current bundle, reloaded first when it changed.
func (p *CAPool) Pool() (*x509.CertPool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.loadLocked(); err != nil {
		if p.pool == nil {
			return nil, err
		}
		if p.Log != nil {
			p.Log.Warn("keeping the previous CA certificates", "path", p.Path, "error", err)
		}
	}
	return p.pool, nil
}

// files lists the bundle's files: Path itself, or the regular files in
// it (symlinks followed: a Kubernetes secret volume's files are links).
func (p *CAPool) files() ([]string, error) {
	fi, err := os.Stat(p.Path)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return []string{p.Path}, nil
	}
	ents, err := os.ReadDir(p.Path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		path := filepath.Join(p.Path, e.Name())
		if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() {
			out = append(out, path)
		}
	}
	return out, nil
}

func (p *CAPool) loadLocked() error {
	files, err := p.files()
	if err != nil {
		return fmt.Errorf("CA certificates %s: %w", p.Path, err)
	}
	var stamps []stamp
	for _, f := range files {
		s, err := stampOf(f)
		if err != nil {
			return fmt.Errorf("CA certificates %s: %w", p.Path, err)
		}
		stamps = append(stamps, s)
	}
	if p.pool != nil && slices.Equal(stamps, p.seen) {
		return nil
	}
	pool := x509.NewCertPool()
	n := 0
	for _, f := range files {
		pem, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("CA certificates %s: %w", p.Path, err)
		}
		if pool.AppendCertsFromPEM(pem) {
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("CA certificates %s: no PEM certificate found", p.Path)
	}
	if p.pool != nil && p.Log != nil {
		p.Log.Info("CA certificates reloaded", "path", p.Path)
	}
	p.pool, p.seen = pool, stamps
	return nil
}

// ServerConfig is a server's tls.Config serving cert; with cas, a client
// certificate is asked for and, when the client gives one, verified
// against cas (Envoy's DownstreamTlsContext with a validation context and
// no require_client_certificate, what consul-dataplane configures for its
// Prometheus listener).
func ServerConfig(cert *Reloader, cas *CAPool) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cert.GetCertificate}
	if cas == nil {
		return cfg
	}
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		pool, err := cas.Pool()
		if err != nil {
			return nil, err
		}
		return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cert.GetCertificate,
			ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: pool}, nil
	}
	return cfg
}
