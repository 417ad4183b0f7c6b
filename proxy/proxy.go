package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/listener"
	"github.com/hashicorp/go-hclog"
)

// Defaults for Config's zero values.
const (
	DefaultConnectTimeout = 5 * time.Second // Consul's local_connect_timeout_ms / connect_timeout_ms
	DefaultIdleTimeout    = time.Hour       // Envoy tcp_proxy's default idle_timeout

	// DefaultMaxPendingHandshakes is the inbound listener's budget of
	// connections still in their handshake without a connection cap; with
	// one it is a tenth of the cap, within [16, 256]. Handshakes take a
	// round trip or two, so even 16 pending means thousands per second;
	// the budget only has to outlast silent sockets (see listener/pending.go).
	DefaultMaxPendingHandshakes = 256
	// DefaultMaxPendingPerSource caps the silent pending handshakes from
	// one source IP (a burst of real handshakes from one client pod is
	// never capped: see listener/pending.go).
	DefaultMaxPendingPerSource = 32
	// pendingSilentAfter: a client that has sent no byte of its
	// ClientHello this long after connecting counts as silent. Real
	// clients send it at once; the margin covers a loaded client.
	pendingSilentAfter = 250 * time.Millisecond
)

// ErrShutdown is the cause recorded for connections cut at the end of a drain.
var ErrShutdown = errors.New("proxy shutting down")

// Endpoints are the addresses the proxy serves, derived from the proxy's
// registration (see EndpointsFromService) and flag overrides.
type Endpoints struct {
	Inbound  string // listen address for inbound (redirected) traffic, e.g. 0.0.0.0:20000
	Outbound string // listen address for outbound (redirected) traffic, e.g. 127.0.0.1:15001
	LocalApp string // where inbound traffic goes, e.g. 127.0.0.1:8080
}

// Config configures a Proxy. Zero values get defaults.
type Config struct {
	Logger         hclog.Logger
	Metrics        *Metrics
	Registry       *Registry
	ConnectTimeout time.Duration
	IdleTimeout    time.Duration // < 0 disables
	// MaxConnections caps connections per listener; 0 means no cap. On
	// the inbound listener it counts connections past their handshake;
	// those still in it count against MaxPendingHandshakes instead.
	MaxConnections int
	// MaxPendingHandshakes is the inbound listener's budget of connections
	// still in their handshake; past it the oldest is reset (outcome
	// pending_limit). 0: the default (see DefaultMaxPendingHandshakes);
	// < 0: no separate budget, MaxConnections counts them.
	MaxPendingHandshakes int
	// MaxPendingPerSource is the same budget per source IP. 0: the
	// default (DefaultMaxPendingPerSource, at most MaxPendingHandshakes);
	// < 0: none.
	MaxPendingPerSource int
	Router              Router   // nil: PassthroughRouter
	Acceptor            Acceptor // nil: PlainAcceptor
	// Dialer dials passthrough destinations and the local app. Nil: a
	// net.Dialer. Tests and the redirect rules rely on it dialing from the
	// proxy's own UID (excluded from redirection).
	Dialer interface {
		DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	}
	// OwnSockets records the sockets ferry dials, to recognize a redirect
	// loop (one of them arriving at the outbound listener). Share it with
	// every other dialer of the process (the MeshRouter's). Nil: a new
	// one. A Dialer that is not a *net.Dialer must record its sockets
	// itself (OwnSockets.Control).
	OwnSockets *OwnSockets
}

// Proxy is the sidecar data path: an inbound and an outbound listener, the
// per-connection handlers, the live-connection registry and readiness.
type Proxy struct {
	cfg Config
	log hclog.Logger
	// warns limits per-connection WARN lines (see ratelog.go).
	warns *rateLog
	m     *Metrics
	reg   *Registry
	base  context.Context // cancelled on hard close: aborts dials, handshakes, pumps
	kill  context.CancelCauseFunc
	// drain is cancelled when Shutdown starts: idle tunnel sessions close.
	drain      context.Context
	startDrain context.CancelFunc

	mu        sync.Mutex
	endpoints *Endpoints
	inbound   *listener.Listener
	outbound  *listener.Listener
	all       []*listener.Listener         // listeners not yet finished (drain waits for all)
	upstreams map[string]*upstreamListener // explicit upstreams by listen address
	failed    map[*listener.Listener]error // listeners whose accept loop stopped on an error
	serveWG   sync.WaitGroup
	checks    []namedCheck
	draining  bool
	// inboundDrained: DrainInbound closed the inbound listener (graceful
	// shutdown); Apply does not reopen it.
	inboundDrained bool
	loopOnce       sync.Once // the misconfiguration behind a redirect loop is logged once

	localApp atomic.Pointer[target]
	router   atomic.Pointer[Router]
	acceptor atomic.Pointer[Acceptor]

	// listenTCP binds a listening socket; tests substitute accept errors.
	listenTCP func(ctx context.Context, addr string) (listener.TCPAcceptor, error)
}

type namedCheck struct {
	name string
	fn   ReadyCheck
}

// New returns a proxy that serves nothing until Apply gives it endpoints.
func New(cfg Config) *Proxy {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics()
	}
	if cfg.Registry == nil {
		cfg.Registry = NewRegistry()
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.Router == nil {
		cfg.Router = PassthroughRouter{}
	}
	if cfg.Acceptor == nil {
		cfg.Acceptor = PlainAcceptor{}
	}
	if cfg.OwnSockets == nil {
		cfg.OwnSockets = NewOwnSockets()
	}
	switch d := cfg.Dialer.(type) {
	case nil:
		cfg.Dialer = cfg.OwnSockets.Dialer(&net.Dialer{})
	case *net.Dialer:
		cfg.Dialer = cfg.OwnSockets.Dialer(d)
	}
	if cfg.MaxPendingHandshakes == 0 {
		cfg.MaxPendingHandshakes = DefaultMaxPendingHandshakes
		if cfg.MaxConnections > 0 {
			cfg.MaxPendingHandshakes = min(max(cfg.MaxConnections/10, 16), DefaultMaxPendingHandshakes)
		}
	}
	if cfg.MaxPendingPerSource == 0 {
		cfg.MaxPendingPerSource = min(DefaultMaxPendingPerSource, max(cfg.MaxPendingHandshakes, 1))
	}
	base, kill := context.WithCancelCause(context.Background())
	drain, startDrain := context.WithCancel(base)
	p := &Proxy{cfg: cfg, log: cfg.Logger, m: cfg.Metrics, reg: cfg.Registry, base: base, kill: kill,
		drain: drain, startDrain: startDrain, warns: newRateLog(logInterval, nil), listenTCP: listenTCP}
	p.SetRouter(cfg.Router)
	p.SetAcceptor(cfg.Acceptor)
	return p
}

// SetRouter replaces the outbound Router for new connections (e.g. once
// the catalog view is built from the registration). nil restores
// PassthroughRouter.
func (p *Proxy) SetRouter(r Router) {
	if r == nil {
		r = PassthroughRouter{}
	}
	p.router.Store(&r)
}

// SetAcceptor replaces the inbound Acceptor for new connections (e.g. the
// mTLS acceptor once the service name is known). nil restores PlainAcceptor.
func (p *Proxy) SetAcceptor(a Acceptor) {
	if a == nil {
		a = PlainAcceptor{}
	}
	p.acceptor.Store(&a)
}

// Metrics returns the proxy's metrics (to serve or extend).
func (p *Proxy) Metrics() *Metrics { return p.m }

// Registry returns the live-connection registry.
func (p *Proxy) Registry() *Registry { return p.reg }

// AddReadyCheck adds a readiness condition, e.g. "identity loaded".
func (p *Proxy) AddReadyCheck(name string, fn ReadyCheck) {
	p.mu.Lock()
	p.checks = append(p.checks, namedCheck{name, fn})
	p.mu.Unlock()
}

// Ready returns nil when the proxy serves traffic, else the reason it does not.
func (p *Proxy) Ready() error {
	p.mu.Lock()
	draining, eps, in, out := p.draining, p.endpoints, p.inbound, p.outbound
	checks := p.checks
	p.mu.Unlock()
	switch {
	case draining || p.isInboundDrained():
		return errors.New("draining")
	case eps == nil:
		return errors.New("proxy configuration not loaded")
	case in == nil || out == nil:
		return errors.New("listeners not up")
	}
	if err := p.listenerFailure(); err != nil {
		return err
	}
	for _, c := range checks {
		if err := c.fn(); err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
	}
	return nil
}

// Addrs returns the bound inbound and outbound addresses (nil before Apply).
func (p *Proxy) Addrs() (inbound, outbound net.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inbound != nil {
		inbound = p.inbound.Addr()
	}
	if p.outbound != nil {
		outbound = p.outbound.Addr()
	}
	return inbound, outbound
}

// Apply (re)configures the proxy. The first call binds both listeners; later
// calls rebind only a listener whose address changed (its established
// connections keep flowing) and switch the local app for new connections.
// On error the previous configuration stays in force.
func (p *Proxy) Apply(e Endpoints) error {
	if _, _, err := net.SplitHostPort(e.LocalApp); err != nil {
		return fmt.Errorf("apply: local app address %q: %w", e.LocalApp, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.draining {
		return errors.New("apply: proxy is shutting down")
	}
	var newIn, newOut *listener.Listener
	var err error
	if !p.inboundDrained && (p.endpoints == nil || p.endpoints.Inbound != e.Inbound) {
		if newIn, err = p.listen(e.Inbound, Inbound); err != nil {
			return err
		}
	}
	if p.endpoints == nil || p.endpoints.Outbound != e.Outbound {
		if newOut, err = p.listen(e.Outbound, Outbound); err != nil {
			if newIn != nil {
				newIn.Close()
			}
			return err
		}
	}
	p.localApp.Store(newTarget(e.LocalApp))
	if newIn != nil {
		p.swap(&p.inbound, newIn, Inbound.String(), p.handleInbound)
	}
	if newOut != nil {
		p.swap(&p.outbound, newOut, Outbound.String(), p.handleOutbound)
	}
	old := p.endpoints
	p.endpoints = &e
	if old == nil || *old != e {
		p.log.Info("serving", "inbound", p.inbound.Addr(), "outbound", p.outbound.Addrs(), "local_app", e.LocalApp)
	}
	return nil
}

// swap starts serving on ln and closes the listener it replaces. Caller holds p.mu.
func (p *Proxy) swap(slot **listener.Listener, ln *listener.Listener, name string, h func(*listener.Listener, *net.TCPConn)) {
	if *slot != nil {
		(*slot).Close()
	}
	*slot = ln
	p.serve(ln, name, func(c *net.TCPConn) { h(ln, c) })
}

// serve runs ln's accept loop. An accept loop that stops on an error (not
// Close) leaves the port bound but dead: it is logged here, once, and
// turns Ready to an error naming the listener, so that traffic moves away
// and the pod gets attention. Caller holds p.mu.
func (p *Proxy) serve(ln *listener.Listener, name string, h listener.Handler) {
	p.pruneLocked()
	p.all = append(p.all, ln)
	p.serveWG.Add(1)
	go func() {
		defer p.serveWG.Done()
		if err := ln.Serve(h); err != nil {
			p.log.Error("listener stopped accepting; not ready", "listener", name, "addr", ln.Addr(), "error", err)
			p.mu.Lock()
			if p.failed == nil {
				p.failed = map[*listener.Listener]error{}
			}
			p.failed[ln] = fmt.Errorf("%s listener %s stopped: %w", name, ln.Addr(), err)
			p.mu.Unlock()
		}
	}()
}

// pruneLocked drops finished listeners (closed, accept loop and handlers
// done) from p.all, which otherwise grows with every rebind. Caller holds p.mu.
func (p *Proxy) pruneLocked() {
	kept := p.all[:0]
	for _, ln := range p.all {
		if ln.Finished() {
			delete(p.failed, ln)
			continue
		}
		kept = append(kept, ln)
	}
	clear(p.all[len(kept):])
	p.all = kept
}

// listenerFailure returns the failure of a listener in service, if any.
func (p *Proxy) listenerFailure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.failed) == 0 {
		return nil
	}
	lns := []*listener.Listener{p.inbound, p.outbound}
	for _, ul := range p.upstreams {
		lns = append(lns, ul.ln)
	}
	for _, ln := range lns {
		if err := p.failed[ln]; err != nil {
			return err
		}
	}
	return nil
}

func listenTCP(ctx context.Context, addr string) (listener.TCPAcceptor, error) {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return l.(*net.TCPListener), nil
}

func (p *Proxy) listen(addr string, d Direction) (*listener.Listener, error) {
	var l listener.TCPAcceptor
	var err error
	if d == Outbound {
		l, err = listenLoopbackPair(p.base, p.listenTCP, addr)
	} else {
		l, err = p.listenTCP(p.base, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("%s listener: %w", d, err)
	}
	dir := d.String()
	opts := listener.Options{
		Name:          dir,
		MaxConns:      p.cfg.MaxConnections,
		Logger:        p.log,
		OnOverLimit:   func() { p.m.Connections.With(dir, "over_limit").Inc() },
		OnAcceptError: func(error) { p.m.AcceptErrors.With(dir).Inc() },
	}
	if d == Inbound && p.cfg.MaxPendingHandshakes > 0 {
		// Only inbound connections have a handshake (the acceptor's);
		// handleInbound calls Established once it is through.
		opts.MaxPending = p.cfg.MaxPendingHandshakes
		opts.MaxPendingPerSource = max(p.cfg.MaxPendingPerSource, 0)
		opts.SilentAfter = pendingSilentAfter
		opts.OnPendingEvicted = func() { p.m.Connections.With(dir, "pending_limit").Inc() }
	}
	return listener.New(l, opts), nil
}

// Shutdown stops accepting (and turns Ready to "draining"), lets established
// connections finish until ctx is done, then closes whatever is left and
// waits for the handlers to return. It is idempotent; calling it again with
// an already-cancelled ctx cuts a running drain short.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	lns := append([]*listener.Listener(nil), p.all...)
	p.mu.Unlock()
	p.startDrain()
	for _, ln := range lns {
		ln.Close()
	}
	p.serveWG.Wait() // accept loops are gone: no new handlers can start

	drained := true
	for _, ln := range lns {
		if !ln.Wait(ctx.Done()) {
			drained = false
			break
		}
	}
	if drained {
		p.kill(ErrShutdown)
		return nil
	}
	n := p.reg.Len()
	p.kill(ErrShutdown) // aborts pumps, dials and handshakes alike
	for _, ln := range lns {
		ln.Wait(nil)
	}
	p.log.Warn("drain deadline reached, closed remaining connections", "connections", n)
	return fmt.Errorf("drain: %w", context.Cause(ctx))
}

// DrainInbound starts a graceful shutdown as consul-dataplane's: the
// inbound listener stops accepting (new inbound connections are refused,
// established ones go on) and Ready turns to "draining", while outbound
// and upstream listeners keep serving, so that the app can finish its
// work through the mesh during the grace period. Shutdown ends it.
func (p *Proxy) DrainInbound() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inboundDrained {
		return
	}
	p.inboundDrained = true
	if p.inbound != nil {
		p.inbound.Close() // stays in p.all: Shutdown waits for its connections
	}
	p.log.Info("inbound listener closed for graceful shutdown; outbound keeps serving")
}

func (p *Proxy) isInboundDrained() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inboundDrained
}

// Close shuts down without draining.
func (p *Proxy) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := p.Shutdown(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// target is a dial address, pre-parsed when it is an IP literal so that
// dialing skips the resolver (about half of a connection's allocations).
type target struct {
	addr string
	ap   netip.AddrPort
}

func newTarget(addr string) *target {
	t := &target{addr: addr}
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		t.ap = ap
	}
	return t
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	return netip.AddrPort{}
}
