package servers

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/proxy/consulguard"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// Config configures a Pool.
type Config struct {
	// Addresses is -addresses (see Discover); Port the HTTP(S) port.
	Addresses string
	Port      int
	// TLS, when set, makes the pool speak HTTPS with it; nil is plain HTTP.
	TLS *tls.Config
	// DialTimeout bounds one connection attempt (default 3 s).
	DialTimeout time.Duration
	Logger      hclog.Logger
	// Discover replaces Discover (tests).
	Discover func(ctx context.Context, addresses string, port int) ([]string, error)
}

// Pool sends HTTP requests to one Consul server at a time and moves to the
// next when it fails: a connection that cannot be made, or is lost before
// the answer (a killed server ends its blocking queries that way). A
// request whose body can be replayed (every GET; PUTs built by consul/api)
// is retried on the next server, so a watch just continues from the same
// index elsewhere: every server answers from the same replicated state.
// Connections already proxied are not the pool's business and are
// untouched. When every known server has failed, the addresses are
// resolved again (a DNS name's servers may have moved).
type Pool struct {
	cfg Config
	log hclog.Logger
	tr  *http.Transport

	mu          sync.Mutex
	servers     []string
	cur         int
	discovered  time.Time
	lastErr     error // of the last request that no server answered
	everOK      bool
	token       atomic.Pointer[string]
	onRejected  func(ctx context.Context, rejected string) (string, error)
	failovers   atomic.Uint64
	discoveries atomic.Uint64
}

// NewPool returns a pool; it discovers the servers on first use.
func NewPool(cfg Config) *Pool {
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 3 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Discover == nil {
		cfg.Discover = Discover
	}
	d := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 15 * time.Second}
	tr := &http.Transport{
		DialContext:           d.DialContext,
		TLSClientConfig:       cfg.TLS,
		TLSHandshakeTimeout:   cfg.DialTimeout,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 0, // blocking queries hold the answer for minutes
	}
	return &Pool{cfg: cfg, log: cfg.Logger, tr: tr}
}

// Client returns a consul/api client whose every request goes through the
// pool (with the pool's token).
func (p *Pool) Client() (*api.Client, error) {
	c := api.DefaultNonPooledConfig()
	c.Address = "consul-servers" // replaced per request by RoundTrip
	c.Scheme = "http"
	if p.cfg.TLS != nil {
		c.Scheme = "https"
	}
	c.Token = ""
	c.TokenFile = ""
	// Bounded answers, as for the agent (proxy/consulguard).
	c.HttpClient = &http.Client{Transport: consulguard.New(p, consulguard.Config{})}
	return api.NewClient(c)
}

// SetToken sets the ACL token sent with requests that carry none.
func (p *Pool) SetToken(t string) { p.token.Store(&t) }

// Token is the current token.
func (p *Pool) Token() string {
	if t := p.token.Load(); t != nil {
		return *t
	}
	return ""
}

// OnTokenRejected sets what the pool calls when a server answers 403 "ACL
// not found" for the token it sent: f returns a new token (a new login),
// and the request is retried once with it.
func (p *Pool) OnTokenRejected(f func(ctx context.Context, rejected string) (string, error)) {
	p.mu.Lock()
	p.onRejected = f
	p.mu.Unlock()
}

// Current is the server in use ("" before the first request).
func (p *Pool) Current() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.servers) == 0 {
		return ""
	}
	return p.servers[p.cur]
}

// Servers is the list of servers known (host:port), in order.
func (p *Pool) Servers() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.servers...)
}

// Err is why no server answered the last request that failed everywhere,
// until a request succeeds; nil then.
func (p *Pool) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// EverConnected reports whether any server has answered yet.
func (p *Pool) EverConnected() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.everOK
}

// Failovers counts moves to another server.
func (p *Pool) Failovers() uint64 { return p.failovers.Load() }

// CloseIdleConnections closes the pool's idle connections.
func (p *Pool) CloseIdleConnections() { p.tr.CloseIdleConnections() }

// list returns the servers and the index to start at, discovering them
// when there are none or when force is set (at most once a second).
func (p *Pool) list(ctx context.Context, force bool) ([]string, int, error) {
	p.mu.Lock()
	servers, cur, when := p.servers, p.cur, p.discovered
	p.mu.Unlock()
	if len(servers) > 0 && (!force || time.Since(when) < time.Second) {
		return servers, cur, nil
	}
	found, err := p.cfg.Discover(ctx, p.cfg.Addresses, p.cfg.Port)
	p.discoveries.Add(1)
	if err != nil {
		if len(servers) > 0 {
			p.log.Warn("re-resolving the server addresses failed; keeping the known servers", "error", err)
			return servers, cur, nil
		}
		return nil, 0, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// Stay on the server in use if it is still listed.
	in := ""
	if len(p.servers) > 0 {
		in = p.servers[p.cur]
	}
	p.servers, p.cur, p.discovered = found, 0, time.Now()
	for i, s := range found {
		if s == in {
			p.cur = i
		}
	}
	if !equal(servers, found) {
		p.log.Info("Consul servers", "servers", strings.Join(found, ","))
	}
	return p.servers, p.cur, nil
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// RoundTrip implements http.RoundTripper.
func (p *Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	resp, sent, err := p.tryAll(req)
	if err != nil || resp.StatusCode != http.StatusForbidden || sent == "" {
		return resp, err
	}
	// A deleted or expired token answers 403 "ACL not found": log in
	// again and retry once (only if the request can be replayed).
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	p.mu.Lock()
	f := p.onRejected
	p.mu.Unlock()
	if f == nil || !strings.Contains(string(body), "ACL not found") || (req.Body != nil && req.GetBody == nil) ||
		req.Header.Get("X-Consul-Token") != "" {
		return resp, nil
	}
	if _, err := f(ctx, sent); err != nil {
		p.log.Error("token rejected by the servers and a new login failed", "error", err)
		return resp, nil
	}
	resp2, _, err := p.tryAll(req)
	if err != nil {
		return resp, nil
	}
	return resp2, nil
}

// tryAll sends req to the servers in turn from the current one until one
// answers. It returns the token it sent.
func (p *Pool) tryAll(req *http.Request) (*http.Response, string, error) {
	ctx := req.Context()
	servers, cur, err := p.list(ctx, false)
	if err != nil {
		p.setErr(err)
		return nil, "", err
	}
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	var errs []string
	var last error
	for attempt := 0; attempt < len(servers)+1; attempt++ {
		if attempt == len(servers) {
			// Every known server failed: look again, and try once more
			// if that found others.
			more, c, err := p.list(ctx, true)
			if err != nil || equal(more, servers) {
				break
			}
			servers, cur = more, c
		}
		s := servers[(cur+attempt)%len(servers)]
		r := req.Clone(ctx)
		r.URL.Host = s
		r.Host = ""
		if req.GetBody != nil {
			if r.Body, err = req.GetBody(); err != nil {
				return nil, "", err
			}
		}
		sent := r.Header.Get("X-Consul-Token")
		if sent == "" && !strings.HasPrefix(r.URL.Path, "/v1/acl/login") {
			if t := p.Token(); t != "" {
				r.Header.Set("X-Consul-Token", t)
				sent = t
			}
		} else {
			sent = ""
		}
		resp, err := p.tr.RoundTrip(r)
		if err == nil {
			p.ok(s)
			return resp, sent, nil
		}
		if ctx.Err() != nil {
			return nil, "", err
		}
		last = err
		errs = append(errs, fmt.Sprintf("%s: %v", s, err))
		p.failed(s, err)
		if !replayable {
			break
		}
	}
	if last == nil {
		last = errors.New("no servers")
	}
	err = fmt.Errorf("no Consul server answered (%s)", strings.Join(errs, "; "))
	p.setErr(err)
	return nil, "", err
}

func (p *Pool) ok(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastErr = nil
	p.everOK = true
	for i, x := range p.servers {
		if x == s {
			p.cur = i
		}
	}
}

// failed moves off s (if it is still the current server).
func (p *Pool) failed(s string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.servers) == 0 || p.servers[p.cur] != s {
		return
	}
	p.cur = (p.cur + 1) % len(p.servers)
	p.failovers.Add(1)
	p.log.Warn("Consul server failed; moving to the next", "server", s, "next", p.servers[p.cur], "error", err)
}

func (p *Pool) setErr(err error) {
	p.mu.Lock()
	p.lastErr = err
	p.mu.Unlock()
}
