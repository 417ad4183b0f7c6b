package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/servers"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// agentlessConfig is how ferry reaches the Consul servers without a local
// agent (from the consul-dataplane command line, dataplane.go).
type agentlessConfig struct {
	Addresses string
	// HTTPPort is the servers' HTTP(S) port: 8501 with TLS, 8500
	// without (consul-dataplane has no such flag: -http-port/DP_HTTP_PORT).
	HTTPPort      int
	TLSDisabled   bool
	CACerts       string
	TLSServerName string
	TLSInsecure   bool

	NodeName           string
	ProxyServiceID     string
	ProxyServiceIDPath string
	Namespace          string
	Partition          string

	CredentialType       string // "", static or login
	StaticToken          string
	LoginAuthMethod      string
	LoginNamespace       string
	LoginPartition       string
	LoginBearerToken     string
	LoginBearerTokenPath string
	LoginMeta            map[string]string
}

// serverConn is the connection to the servers: pool, client, token.
type serverConn struct {
	cfg     *agentlessConfig
	pool    *servers.Pool
	client  *api.Client
	creds   *servers.Credentials
	proxyID string
	// idErr is why the proxy ID could not be read (ready explains it).
	idErr atomic.Pointer[error]
	// stopWatch ends the token check (close).
	stopWatch context.CancelFunc
	watchDone chan struct{}
}

func newServerConn(a *agentlessConfig, log hclog.Logger) (*serverConn, error) {
	tlsCfg, err := serverTLS(a)
	if err != nil {
		return nil, err
	}
	pool := servers.NewPool(servers.Config{Addresses: a.Addresses, Port: a.HTTPPort, TLS: tlsCfg, Logger: log.Named("servers")})
	client, err := pool.Client()
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	var login *servers.Login
	if a.CredentialType == "login" {
		login = &servers.Login{AuthMethod: a.LoginAuthMethod, BearerToken: a.LoginBearerToken,
			BearerTokenPath: a.LoginBearerTokenPath, Meta: a.LoginMeta,
			Namespace: a.LoginNamespace, Partition: a.LoginPartition}
	}
	creds := servers.NewCredentials(pool, client, a.StaticToken, login, log.Named("acl"))
	return &serverConn{cfg: a, pool: pool, client: client, creds: creds}, nil
}

// serverTLS is the TLS configuration for the servers' HTTPS (nil: plain
// HTTP). -ca-certs is a PEM file or a directory of them.
func serverTLS(a *agentlessConfig) (*tls.Config, error) {
	if a.TLSDisabled {
		return nil, nil
	}
	c := &tls.Config{ServerName: a.TLSServerName, InsecureSkipVerify: a.TLSInsecure, MinVersion: tls.VersionTLS12}
	if a.CACerts == "" {
		return c, nil // the system roots
	}
	pool := x509.NewCertPool()
	files := []string{a.CACerts}
	if st, err := os.Stat(a.CACerts); err != nil {
		return nil, fmt.Errorf("-ca-certs: %w", err)
	} else if st.IsDir() {
		files, _ = filepath.Glob(filepath.Join(a.CACerts, "*"))
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			if len(files) == 1 {
				return nil, fmt.Errorf("-ca-certs: %w", err)
			}
			continue
		}
		if pool.AppendCertsFromPEM(b) {
			n++
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("-ca-certs %s: no PEM certificates", a.CACerts)
	}
	c.RootCAs = pool
	return c, nil
}

// start reads the proxy ID and logs in, retrying (and saying why through
// readyErr) until it succeeds; false when a signal, /quitquitquit or
// /graceful_shutdown came first (there is nothing to drain yet).
func (s *serverConn) start(sigs <-chan os.Signal, lc *lifecycle, log hclog.Logger) bool {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-sigs:
			log.Info("signal received before the login succeeded: exiting")
			cancel()
		case <-lc.quit:
			log.Info("quitquitquit before the login succeeded: exiting")
			cancel()
		case <-lc.shutdown:
			log.Info("graceful shutdown before the login succeeded: exiting")
			cancel()
		case <-stop:
		}
	}()
	for s.proxyID == "" {
		id, err := readProxyID(s.cfg)
		if err == nil {
			s.proxyID = id
			s.idErr.Store(nil)
			break
		}
		s.idErr.Store(&err)
		log.Warn("no proxy service ID yet", "error", err)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(time.Second):
		}
	}
	if err := s.creds.Start(ctx); err != nil {
		return false
	}
	wctx, wcancel := context.WithCancel(context.Background())
	s.stopWatch, s.watchDone = wcancel, make(chan struct{})
	go func() {
		defer close(s.watchDone)
		s.creds.Watch(wctx, servers.CheckInterval)
	}()
	log.Info("agentless: talking to the Consul servers", "addresses", s.cfg.Addresses, "node", s.cfg.NodeName,
		"proxy_id", s.proxyID, "credentials", orDefault(s.cfg.CredentialType, "none"))
	return true
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// readProxyID is -proxy-service-id, else the content of
// -proxy-service-id-path (written by consul-k8s's connect-init).
func readProxyID(a *agentlessConfig) (string, error) {
	if a.ProxyServiceID != "" {
		return a.ProxyServiceID, nil
	}
	b, err := os.ReadFile(a.ProxyServiceIDPath)
	if err != nil {
		return "", fmt.Errorf("-proxy-service-id-path: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("-proxy-service-id-path %s is empty", a.ProxyServiceIDPath)
	}
	return id, nil
}

// serverDNSPort is where Consul servers answer DNS (consul-k8s exposes it
// as the <release>-dns Service's port 53 too).
const serverDNSPort = "8600"

// dnsAddrs are the servers' DNS addresses, for .consul names ferry does not
// answer itself.
func (s *serverConn) dnsAddrs() []string {
	var out []string
	for _, hp := range s.pool.Servers() {
		if h, _, err := net.SplitHostPort(hp); err == nil {
			out = append(out, net.JoinHostPort(h, serverDNSPort))
		}
	}
	return out
}

func (s *serverConn) registration() proxy.Registration {
	return proxy.CatalogRegistration{Client: s.client, Node: s.cfg.NodeName, ID: s.proxyID,
		Namespace: s.cfg.Namespace, Partition: s.cfg.Partition}
}

// readyErr is why ferry is not ready on the servers' side: no proxy ID,
// a failing login (always: the token is what every read needs), or no
// server reached yet. After the first answer a lost server does not make
// ferry unready: it serves from what it knows.
func (s *serverConn) readyErr() error {
	if e := s.idErr.Load(); e != nil {
		return *e
	}
	// No server reached is the root cause of a failing login: say so.
	if !s.pool.EverConnected() {
		if err := s.pool.Err(); err != nil {
			return fmt.Errorf("consul servers: %w", err)
		}
	}
	if err := s.creds.Err(); err != nil {
		return fmt.Errorf("consul login: %w", err)
	}
	if !s.pool.EverConnected() {
		return errors.New("consul servers: not contacted yet")
	}
	return nil
}

// close logs out (a login token is deleted, so none is left behind).
func (s *serverConn) close(log hclog.Logger) {
	if s.stopWatch != nil {
		s.stopWatch()
		<-s.watchDone
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.creds.Close(ctx); err != nil {
		log.Warn("ACL logout failed", "error", err)
	}
	s.pool.CloseIdleConnections()
}

// lateAdmin answers /ready and /metrics before the sidecar exists (with
// pre's reason or "starting") and from the sidecar's proxy afterwards.
type lateAdmin struct {
	pre   func() error
	extra proxy.Collector
	p     atomic.Pointer[proxy.Proxy]
}

func (l *lateAdmin) set(p *proxy.Proxy) { l.p.Store(p) }

func (l *lateAdmin) Ready() error {
	if l.pre != nil {
		if err := l.pre(); err != nil {
			return err
		}
	}
	p := l.p.Load()
	if p == nil {
		return errors.New("starting")
	}
	return p.Ready()
}

func (l *lateAdmin) WritePrometheus(w io.Writer) {
	if p := l.p.Load(); p != nil {
		p.Metrics().Set.WritePrometheus(w)
	}
	if l.extra != nil {
		l.extra.WritePrometheus(w)
	}
}

// WritePrometheus publishes the connection to the servers.
func (s *serverConn) WritePrometheus(w io.Writer) {
	fmt.Fprintf(w, "# HELP ferry_consul_server_failovers_total Moves to another Consul server after the one in use failed.\n# TYPE ferry_consul_server_failovers_total counter\nferry_consul_server_failovers_total %d\n", s.pool.Failovers())
	fmt.Fprintf(w, "# HELP ferry_consul_logins_total Successful ACL logins (the first, then one per rejected token).\n# TYPE ferry_consul_logins_total counter\nferry_consul_logins_total %d\n", s.creds.Logins())
	if cur := s.pool.Current(); cur != "" {
		fmt.Fprintf(w, "# HELP ferry_consul_server Which Consul server is in use.\n# TYPE ferry_consul_server gauge\nferry_consul_server{server=%q} 1\n", cur)
	}
}
