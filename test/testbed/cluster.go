package testbed

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Cluster is three Consul servers, each in its own network namespace on the
// testbed bridge, as a production datacenter runs them: bootstrap_expect=3,
// ACLs on with default deny, TLS everywhere and HTTPS only (port 8501), as
// consul-k8s's chart configures its servers. Unlike the dev agent it keeps
// its state on disk, so servers can be killed and restarted.
type Cluster struct {
	Servers []*Server
	// Datacenter and ServerName (the name in the servers' certificates,
	// what -tls-server-name names).
	Datacenter, ServerName string
	// CAFile is the PEM of the CA that signed the servers' certificates.
	CAFile string
	// Token is the initial management token.
	Token string
	// Client talks to the servers over HTTPS with Token, failing over
	// between them (for the test's own reads and writes).
	Client *api.Client

	consul string
	dir    string
	logf   func(string, ...any)
}

// Server is one Consul server of a Cluster.
type Server struct {
	Name string
	Pod  *Pod
	c    *Cluster

	mu   sync.Mutex
	proc *Process
	logs []string // output of earlier runs
}

// Well-known ports inside each server's namespace (the chart's).
const (
	ClusterHTTPSPort = 8501
	ClusterGRPCPort  = 8502
	ClusterDNSPort   = 8600
)

// NewCluster builds a testbed with a three-server cluster on its bridge;
// both are torn down at cleanup.
func NewCluster(t testing.TB) (*Testbed, *Cluster) {
	t.Helper()
	tb := New(t)
	c, err := tb.StartCluster(ConsulBinary(t), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, s := range c.Servers {
				t.Logf("consul server %s log (tail):\n%s", s.Name, tail(s.Log(), 40))
			}
		}
	})
	return tb, c
}

// StartCluster starts the three servers in parallel and waits until they
// have a leader, the ACL system and the Connect CA are up.
func (tb *Testbed) StartCluster(consulPath string, logf func(string, ...any)) (*Cluster, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	start := time.Now()
	dir, err := os.MkdirTemp("", "ferry-cluster-"+tb.Name+"-")
	if err != nil {
		return nil, err
	}
	tb.addTeardown(func() { os.RemoveAll(dir) })
	c := &Cluster{Datacenter: "dc1", ServerName: "server.dc1.consul", consul: consulPath, dir: dir, logf: logf,
		Token: uuid()}
	var ips []string
	for i := range 3 {
		p, err := tb.NewPod(fmt.Sprintf("consul%d", i))
		if err != nil {
			return nil, err
		}
		c.Servers = append(c.Servers, &Server{Name: fmt.Sprintf("server%d", i), Pod: p, c: c})
		ips = append(ips, p.IP.String())
	}
	if err := c.makeTLS(ips); err != nil {
		return nil, err
	}
	for _, s := range c.Servers {
		if err := c.writeConfig(s, ips); err != nil {
			return nil, err
		}
	}
	if c.Client, err = c.NewClient(c.Token); err != nil {
		return nil, err
	}
	tb.addTeardown(c.stopAll)
	errs := make(chan error, len(c.Servers))
	for _, s := range c.Servers {
		go func() { errs <- s.startProcess() }()
	}
	for range c.Servers {
		if err := <-errs; err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		return nil, err
	}
	if err := c.anonymousDNS(); err != nil {
		return nil, err
	}
	logf("cluster %s: servers %s up in %v", tb.Name, strings.Join(ips, ","), time.Since(start).Round(time.Millisecond))
	return c, nil
}

// makeTLS creates the CA and one server certificate (valid for every
// server's IP) with the consul CLI, as the Consul docs and consul-k8s do.
func (c *Cluster) makeTLS(ips []string) error {
	if out, err := c.consulCmd("tls", "ca", "create", "-days", "2"); err != nil {
		return fmt.Errorf("testbed: consul tls ca create: %w\n%s", err, out)
	}
	args := []string{"tls", "cert", "create", "-server", "-dc", c.Datacenter, "-days", "2"}
	for _, ip := range ips {
		args = append(args, "-additional-ipaddress", ip)
	}
	if out, err := c.consulCmd(args...); err != nil {
		return fmt.Errorf("testbed: consul tls cert create: %w\n%s", err, out)
	}
	c.CAFile = filepath.Join(c.dir, "consul-agent-ca.pem")
	return nil
}

func (c *Cluster) consulCmd(args ...string) ([]byte, error) {
	cmd, err := Command(c.consul, args...)
	if err != nil {
		return nil, err
	}
	cmd.Dir = c.dir
	return cmd.CombinedOutput()
}

func (c *Cluster) writeConfig(s *Server, ips []string) error {
	ip := s.Pod.IP.String()
	data := filepath.Join(c.dir, s.Name)
	if err := os.MkdirAll(data, 0o700); err != nil {
		return err
	}
	join := `"` + strings.Join(ips, `","`) + `"`
	hcl := fmt.Sprintf(`
datacenter = %q
node_name = %q
server = true
bootstrap_expect = 3
data_dir = %q
bind_addr = %q
client_addr = "%s 127.0.0.1"
retry_join = [%s]
retry_interval = "1s"
disable_update_check = true
log_level = "info"
ports {
  http = -1
  https = %d
  grpc = -1
  grpc_tls = %d
  dns = %d
  serf_wan = -1
}
tls {
  defaults {
    ca_file = %q
    cert_file = %q
    key_file = %q
    verify_outgoing = true
  }
  internal_rpc {
    verify_incoming = true
    verify_server_hostname = true
  }
}
acl {
  enabled = true
  default_policy = "deny"
  enable_token_persistence = true
  tokens {
    initial_management = %q
    agent = %q
  }
}
connect { enabled = true }
performance { raft_multiplier = 1 }
# Dev-mode gossip timing: a dead server is noticed in about a second.
gossip_lan {
  gossip_interval = "100ms"
  probe_interval = "400ms"
  probe_timeout = "200ms"
  suspicion_mult = 3
}
`, c.Datacenter, s.Name, data, ip, ip, join, ClusterHTTPSPort, ClusterGRPCPort, ClusterDNSPort,
		c.CAFile, filepath.Join(c.dir, c.Datacenter+"-server-consul-0.pem"), filepath.Join(c.dir, c.Datacenter+"-server-consul-0-key.pem"),
		c.Token, c.Token)
	return os.WriteFile(filepath.Join(c.dir, s.Name+".hcl"), []byte(hcl), 0o600)
}

// NewClient returns an HTTPS client to the cluster with token (empty: none).
// Requests go to the first server that answers.
func (c *Cluster) NewClient(token string) (*api.Client, error) {
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("testbed: bad CA PEM")
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: c.ServerName},
		DialContext: (&net.Dialer{Timeout: 2 * time.Second}).DialContext, MaxIdleConnsPerHost: 8}
	cfg := api.DefaultConfig()
	cfg.Address = "cluster"
	cfg.Scheme = "https"
	cfg.Token = token
	cfg.HttpClient = &http.Client{Transport: &anyServer{c: c, tr: tr}}
	return api.NewClient(cfg)
}

// anyServer sends each request to the first server that accepts the
// connection (test-side only; ferry has its own failover).
type anyServer struct {
	c  *Cluster
	tr *http.Transport
}

func (a *anyServer) RoundTrip(req *http.Request) (*http.Response, error) {
	var last error
	for _, s := range a.c.Servers {
		r := req.Clone(req.Context())
		r.URL.Host = s.HTTPSAddr()
		r.Host = ""
		if req.GetBody != nil {
			r.Body, _ = req.GetBody()
		}
		resp, err := a.tr.RoundTrip(r)
		if err == nil {
			return resp, nil
		}
		last = err
		if req.Body != nil && req.GetBody == nil {
			break
		}
	}
	return nil, last
}

// Addresses is the servers' IPs, comma-separated.
func (c *Cluster) Addresses() string {
	var ips []string
	for _, s := range c.Servers {
		ips = append(ips, s.Pod.IP.String())
	}
	return strings.Join(ips, ",")
}

// WaitReady waits until every running server agrees on a leader, the
// initial management token works and the Connect CA has an active root.
func (c *Cluster) WaitReady(ctx context.Context) error {
	var last error
	for {
		if last = c.ready(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			for _, s := range c.Servers {
				c.logf("server %s log tail:\n%s", s.Name, tail(s.Log(), 20))
			}
			return fmt.Errorf("testbed: cluster not ready: %w (last: %v)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) ready() error {
	leader, err := c.Client.Status().Leader()
	if err != nil || leader == "" {
		return fmt.Errorf("leader %q: %v", leader, err)
	}
	peers, err := c.Client.Status().Peers()
	if err != nil || len(peers) != 3 {
		return fmt.Errorf("peers %v: %v", peers, err)
	}
	if _, _, err := c.Client.ACL().TokenReadSelf(nil); err != nil {
		return fmt.Errorf("acl: %w", err)
	}
	roots, _, err := c.Client.Agent().ConnectCARoots(nil)
	if err != nil || roots == nil || roots.ActiveRootID == "" {
		return fmt.Errorf("ca roots: %v", err)
	}
	return nil
}

// anonymousDNS lets the anonymous token read services and nodes, as
// consul-k8s's server-acl-init does when Consul DNS is enabled: the
// servers answer DNS with it.
func (c *Cluster) anonymousDNS() error {
	acl := c.Client.ACL()
	pol, _, err := acl.PolicyCreate(&api.ACLPolicy{Name: "anonymous-token-policy",
		Rules: `node_prefix "" { policy = "read" } service_prefix "" { policy = "read" }`}, nil)
	if err != nil {
		return fmt.Errorf("testbed: anonymous policy: %w", err)
	}
	const anonymous = "00000000-0000-0000-0000-000000000002"
	if _, _, err := acl.TokenUpdate(&api.ACLToken{AccessorID: anonymous,
		Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil); err != nil {
		return fmt.Errorf("testbed: anonymous token: %w", err)
	}
	return nil
}

// Leader returns the server that is the raft leader now.
func (c *Cluster) Leader() (*Server, error) {
	leader, err := c.Client.Status().Leader()
	if err != nil {
		return nil, err
	}
	host, _, _ := net.SplitHostPort(leader)
	for _, s := range c.Servers {
		if s.Pod.IP.String() == host {
			return s, nil
		}
	}
	return nil, fmt.Errorf("testbed: leader %q is none of the servers", leader)
}

func (c *Cluster) stopAll() {
	var wg sync.WaitGroup
	for _, s := range c.Servers {
		wg.Go(s.Kill)
	}
	wg.Wait()
}

// HTTPSAddr is the server's HTTPS address on the bridge.
func (s *Server) HTTPSAddr() string {
	return net.JoinHostPort(s.Pod.IP.String(), fmt.Sprint(ClusterHTTPSPort))
}

// Start starts a stopped server (keeping its data) and returns once its
// process runs; use Cluster.WaitReady to wait for the cluster.
func (s *Server) Start() error { return s.startProcess() }

func (s *Server) startProcess() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return nil
	}
	pr, err := s.Pod.StartProcess(Proc{Name: "consul " + s.Name}, s.c.consul, "agent",
		"-config-file", filepath.Join(s.c.dir, s.Name+".hcl"))
	if err != nil {
		return err
	}
	s.proc = pr
	return nil
}

// Stop stops the server gracefully (SIGTERM: a server does not leave the
// raft configuration on it) and waits for it to exit.
func (s *Server) Stop() { s.stop(syscall.SIGTERM) }

// Kill kills the server (SIGKILL) and waits for it to exit.
func (s *Server) Kill() { s.stop(syscall.SIGKILL) }

func (s *Server) stop(sig syscall.Signal) {
	s.mu.Lock()
	pr := s.proc
	s.proc = nil
	s.mu.Unlock()
	if pr == nil {
		return
	}
	pr.Signal(sig)
	if pr.Wait(10*time.Second) != nil {
		pr.Stop()
	}
	s.mu.Lock()
	s.logs = append(s.logs, pr.Output())
	s.mu.Unlock()
}

// Running reports whether the server's process is running.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc != nil
}

// Log is the server's output across its runs.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := strings.Join(s.logs, "\n--- restart ---\n")
	if s.proc != nil {
		out += s.proc.Output()
	}
	return out
}

func uuid() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
