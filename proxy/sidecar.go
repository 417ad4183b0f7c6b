package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/expose"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/ferrymesh/ferry/proxy/mergedmetrics"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// SidecarConfig is everything a mesh sidecar needs beyond the data path.
type SidecarConfig struct {
	Client  *api.Client
	ProxyID string
	// Registration is where the proxy's registration is read; default:
	// the local agent's service ProxyID (AgentRegistration).
	Registration Registration
	// Overrides replace the endpoints derived from the registration where
	// set (flags -inbound-addr, -outbound-addr, -local-app).
	Overrides Endpoints
	// Proxy configures the data path (timeouts, cap, logger).
	Proxy Config
	// Permissive lets clients that do not speak TLS through to the app
	// (Consul's permissive MutualTLSMode); otherwise they are refused.
	Permissive        bool
	HandshakeTimeout  time.Duration
	DisableRevocation bool
	// DisableTunnels turns off tunnel sessions between ferry sidecars
	// (tunnel.go), both ways: one mTLS session per connection.
	DisableTunnels bool
	// KTLS is the kernel TLS policy between ferry sidecars (ktls.go),
	// decided at start by the caller (ktls.Decide). Kernel TLS carries
	// one-connection sessions only: Required needs DisableTunnels.
	KTLS KTLS
	// VirtualCIDRs, when set, bound the `virtual` tagged addresses the
	// catalog view honours (flag -virtual-cidr).
	VirtualCIDRs []netip.Prefix
	// DefaultIntentionPolicy, when set, is the decision when no intention
	// matches; otherwise it comes from Consul (intentions.ConsulFetcher).
	DefaultIntentionPolicy intentions.Policy
	// PromScrapePath and PromServiceMetricsURL configure the merged
	// metrics served on the registration's envoy_prometheus_bind_addr
	// (consul-dataplane's -telemetry-prom-scrape-path and
	// -telemetry-prom-service-metrics-url).
	PromScrapePath        string
	PromServiceMetricsURL string
	// PromTLS, when set, makes that listener HTTPS only
	// (-telemetry-prom-{cert-file,key-file,ca-certs-path}).
	PromTLS *tls.Config
}

// Sidecar is the whole sidecar: the data path plus the mesh view it routes
// and authorizes by (catalog, identity, intentions), configured from and
// kept in step with the proxy's registration.
type Sidecar struct {
	cfg   SidecarConfig
	log   hclog.Logger
	proxy *Proxy
	view  *catalog.View
	id    *mtls.Identity
	// expose serves the registration's Expose.Paths (the kubelet's
	// probes, rewritten by the injector to 2030x/2040x/2050x).
	expose *expose.Server
	// checks finds the agent's Expose.Checks listeners (agent mode only).
	checks *checkExposer
	// exposeMu serializes applyExposed; regPaths and checkPaths are
	// what it last served.
	exposeMu   sync.Mutex
	regPaths   []expose.Path
	checkPaths []expose.Path
	checksErr  string
	exposeErr  string
	// merged serves ferry's and the app's metrics on
	// envoy_prometheus_bind_addr.
	merged *mergedmetrics.Server

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	fatal  chan error

	mu         sync.Mutex
	service    string // destination service, set by the first registration
	intentions *intentions.Watcher
	acceptor   *MeshAcceptor
	router     *MeshRouter
	ports      atomic.Pointer[portMap]
	closeOnce  sync.Once
	dcKnown    chan struct{} // closed when dc is set
	dc         string
}

// StartSidecar starts watching the registration and the mesh and serves as
// soon as the registration is known. Readiness (/ready) waits for the
// identity, the intentions and the catalog.
func StartSidecar(cfg SidecarConfig) (*Sidecar, error) {
	if cfg.Registration == nil && cfg.Client != nil && cfg.ProxyID != "" {
		cfg.Registration = AgentRegistration{Agent: cfg.Client.Agent(), ID: cfg.ProxyID}
	}
	if cfg.Client == nil || cfg.Registration == nil {
		return nil, errors.New("sidecar: need a Consul client and a proxy registration")
	}
	log := cfg.Proxy.Logger
	if log == nil {
		log = hclog.NewNullLogger()
		cfg.Proxy.Logger = log
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Sidecar{cfg: cfg, log: log, ctx: ctx, cancel: cancel, fatal: make(chan error, 1), id: mtls.NewIdentity(),
		dcKnown: make(chan struct{})}
	if cfg.Proxy.OwnSockets == nil {
		cfg.Proxy.OwnSockets = NewOwnSockets()
	}
	s.proxy = New(cfg.Proxy)
	s.expose = expose.New(expose.Config{Logger: log.Named("expose")})
	if ar, ok := cfg.Registration.(AgentRegistration); ok && ar.Agent != nil {
		s.checks = &checkExposer{agent: ar.Agent, log: log.Named("expose")}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			t := time.NewTicker(exposeChecksPoll)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					s.applyExposed(nil)
				}
			}
		}()
	}
	s.merged = mergedmetrics.NewServer(cfg.PromScrapePath, mergedmetrics.Config{
		Own: s.proxy.Metrics().Set.WritePrometheus, ServiceURL: cfg.PromServiceMetricsURL}, cfg.PromTLS, log.Named("metrics"))
	src := catalog.ConsulSource{Client: cfg.Client}
	var retryMax time.Duration // 0: the view's default
	if _, ok := cfg.Registration.(CatalogRegistration); ok {
		src.Datacenter = s.datacenter
		// Agentless: after the servers come back, ferry must be current
		// within seconds; the pool already spreads the load over them.
		retryMax = agentlessRetryMax
	}
	s.view = catalog.Start(ctx, src, catalog.Options{Logger: log.Named("catalog"), RetryMax: retryMax,
		VirtualCIDRs: cfg.VirtualCIDRs})
	s.router = NewMeshRouter(s.view, s.id, log.Named("outbound"))
	// mTLS dials to peers loop too when ferry's UID is not exempted.
	s.router.dialer = cfg.Proxy.OwnSockets.Dialer(s.router.dialer)
	if cfg.DisableTunnels {
		s.router.DisableTunnels()
	}
	s.router.SetKTLS(cfg.KTLS)
	s.proxy.SetRouter(s.router)
	s.proxy.Metrics().Set.Register(s.router.TLSModeMetric())
	s.proxy.Metrics().Set.Register(s.router.HandshakeMetric())
	s.proxy.Metrics().Set.Register(s.router.TunnelMetric())

	denied := NewDeniedMetric()
	s.proxy.Metrics().Set.Register(denied)
	s.proxy.Metrics().Set.Register(intentionsCollector{s})
	s.proxy.Metrics().Set.Register(catalogCollector{s.view})
	s.acceptor = &MeshAcceptor{Identity: s.id, HandshakeTimeout: cfg.HandshakeTimeout,
		Permissive: cfg.Permissive, Logger: log.Named("inbound"), Denied: denied, Ports: s.localPort,
		DisableTunnels: cfg.DisableTunnels, KTLS: cfg.KTLS, TLSModes: s.router.TLSModeMetric()}
	s.acceptor.Init()

	s.proxy.AddReadyCheck("identity", func() error {
		if st := s.id.Status(); !st.Ready {
			return errors.New(st.Reason)
		}
		return nil
	})
	s.proxy.AddReadyCheck("intentions", func() error {
		s.mu.Lock()
		w := s.intentions
		s.mu.Unlock()
		if w == nil || !w.Loaded() {
			return errors.New("not loaded")
		}
		return nil
	})
	s.proxy.AddReadyCheck("catalog", func() error {
		select {
		case <-s.view.Ready():
			return nil
		default:
			return errors.New("not loaded")
		}
	})

	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		applied := false
		cfg.Registration.Watch(ctx, log, func(svc *api.AgentService) {
			err := s.apply(svc)
			switch {
			case err == nil:
				applied = true
			case !applied:
				select {
				case s.fatal <- err:
				default:
				}
			default:
				log.Error("ignoring proxy registration update", "error", err)
			}
		})
	}()
	return s, nil
}

// Proxy is the data path (admin, metrics, registry).
func (s *Sidecar) Proxy() *Proxy { return s.proxy }

// View is the catalog view (the DNS server reads it).
func (s *Sidecar) View() *catalog.View { return s.view }

// Identity is the sidecar's mesh identity.
func (s *Sidecar) Identity() *mtls.Identity { return s.id }

// Fatal delivers an error when the first registration cannot be served.
func (s *Sidecar) Fatal() <-chan error { return s.fatal }

// apply serves one version of the registration.
func (s *Sidecar) apply(svc *api.AgentService) error {
	if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil || svc.Proxy.DestinationServiceName == "" {
		return fmt.Errorf("sidecar: %s is not a connect-proxy registration with a destination service", svc.ID)
	}
	eps, err := EndpointsFromService(svc)
	if err != nil {
		return err
	}
	eps = overrideEndpoints(eps, s.cfg.Overrides)
	ports, err := portsFromService(svc)
	if err != nil {
		return err
	}
	s.ports.Store(ports)

	dest := svc.Proxy.DestinationServiceName
	s.mu.Lock()
	if s.dc == "" && svc.Datacenter != "" {
		s.dc = svc.Datacenter
		close(s.dcKnown)
	}
	if s.service == "" {
		s.service = dest
		s.startIdentity(dest)
		w, err := intentions.Watch(s.ctx, intentions.Config{
			Destination:       dest,
			Fetch:             intentions.ConsulFetcher(s.cfg.Client, dest, 0, s.cfg.DefaultIntentionPolicy),
			Logger:            s.log.Named("intentions"),
			DisableRevocation: s.cfg.DisableRevocation,
			MaxBackoff:        s.maxBackoff(),
		})
		if err != nil {
			s.mu.Unlock()
			return err
		}
		s.intentions = w
		s.acceptor.Intentions = w
		s.acceptor.Service = dest
		s.proxy.SetAcceptor(s.acceptor)
	} else if s.service != dest {
		cur := s.service
		s.mu.Unlock()
		return fmt.Errorf("sidecar: destination service changed from %s to %s; restart the sidecar", cur, dest)
	}
	s.mu.Unlock()

	if err := s.proxy.Apply(eps); err != nil {
		return err
	}
	s.applyExposed(svc)
	promAddr, _ := svc.Proxy.Config["envoy_prometheus_bind_addr"].(string)
	if err := s.merged.Apply(promAddr); err != nil {
		s.log.Error("serving merged metrics", "error", err)
	}
	return s.proxy.SetUpstreams(s.upstreams(svc.Proxy.Upstreams))
}

// agentlessRetryMax caps the watches' error backoff in agentless mode.
const agentlessRetryMax = 4 * time.Second

// maxBackoff is the intentions watch's backoff cap (0: its default).
func (s *Sidecar) maxBackoff() time.Duration {
	if _, ok := s.cfg.Registration.(CatalogRegistration); ok {
		return agentlessRetryMax
	}
	return 0
}

// datacenter is the registration's datacenter, once known (agentless).
func (s *Sidecar) datacenter(ctx context.Context) (string, error) {
	select {
	case <-s.dcKnown:
		return s.dc, nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (s *Sidecar) startIdentity(service string) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = s.id.Watch(s.ctx, s.cfg.Client, service, mtls.WatchOptions{Logger: s.log})
	}()
}

// upstreams turns the registration's explicit upstreams into listeners.
func (s *Sidecar) upstreams(ups []api.Upstream) []Upstream {
	var out []Upstream
	for _, u := range ups {
		if u.LocalBindPort == 0 {
			continue
		}
		if u.DestinationType != "" && u.DestinationType != api.UpstreamDestTypeService {
			s.log.Warn("upstream type not supported; skipped", "upstream", u.DestinationName, "type", u.DestinationType)
			continue
		}
		host := u.LocalBindAddress
		if host == "" {
			host = "127.0.0.1"
		}
		svc := catalog.Service{Name: u.DestinationName, Datacenter: u.Datacenter}
		out = append(out, Upstream{
			Addr:  net.JoinHostPort(host, strconv.Itoa(u.LocalBindPort)),
			Name:  u.DestinationName,
			Route: func() Route { return s.router.Upstream(svc, false, netip.AddrPort{}) },
		})
	}
	return out
}

// Shutdown drains the data path until ctx is done, then stops the watches.
func (s *Sidecar) Shutdown(ctx context.Context) error {
	err := s.proxy.Shutdown(ctx)
	s.closeOnce.Do(func() {
		s.expose.Close()
		s.merged.Close()
		s.router.Close()
		s.cancel()
		s.wg.Wait()
		s.mu.Lock()
		w := s.intentions
		s.mu.Unlock()
		if w != nil {
			w.Close()
		}
		s.view.Close()
	})
	return err
}

// applyExposed serves the registration's Expose.Paths and, in agent mode,
// the listeners of its exposed checks; svc is a new registration, nil to
// re-read the checks only. A port that cannot be opened is logged and
// retried on the next call; it must not take the data path down with it.
func (s *Sidecar) applyExposed(svc *api.AgentService) {
	s.exposeMu.Lock()
	defer s.exposeMu.Unlock()
	if svc != nil {
		s.regPaths = exposedPaths(svc)
		if s.checks != nil && !s.checks.set(svc) {
			s.checkPaths = nil
		}
	}
	if s.checks != nil {
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		paths, err := s.checks.paths(ctx)
		cancel()
		switch {
		case err != nil:
			// Keep the listeners the agent's checks had: a blip in
			// reaching the agent must not fail them.
			if msg := err.Error(); msg != s.checksErr && s.ctx.Err() == nil {
				s.log.Warn("exposed checks not refreshed", "error", err)
				s.checksErr = msg
			}
		default:
			s.checksErr = ""
			s.checkPaths = paths
		}
	}
	err := s.expose.Apply(append(slices.Clone(s.regPaths), s.checkPaths...))
	switch {
	case err == nil:
		s.exposeErr = ""
	case svc != nil || err.Error() != s.exposeErr: // the poll repeats itself
		s.log.Error("serving exposed paths", "error", err)
		s.exposeErr = err.Error()
	}
}

// exposedPaths are the registration's Expose.Paths, to the app at its
// LocalServiceAddress (127.0.0.1 when unset, as Envoy's exposed clusters).
func exposedPaths(svc *api.AgentService) []expose.Path {
	var out []expose.Path
	for _, p := range svc.Proxy.Expose.Paths {
		out = append(out, expose.Path{ListenerPort: p.ListenerPort, Path: p.Path, LocalPathPort: p.LocalPathPort,
			LocalAddress: svc.Proxy.LocalServiceAddress, Protocol: p.Protocol})
	}
	return out
}

func overrideEndpoints(e, o Endpoints) Endpoints {
	if o.Inbound != "" {
		e.Inbound = o.Inbound
	}
	if o.Outbound != "" {
		e.Outbound = o.Outbound
	}
	if o.LocalApp != "" {
		e.LocalApp = o.LocalApp
	}
	return e
}

// intentionsCollector publishes the intentions watcher's counters.
type intentionsCollector struct{ s *Sidecar }

func (c intentionsCollector) WritePrometheus(w io.Writer) {
	c.s.mu.Lock()
	iw := c.s.intentions
	c.s.mu.Unlock()
	if iw == nil {
		return
	}
	st := iw.Stats()
	b2i := func(b bool) int {
		if b {
			return 1
		}
		return 0
	}
	fmt.Fprintf(w, "# HELP ferry_intentions_loaded Whether the destination's intentions have been loaded.\n# TYPE ferry_intentions_loaded gauge\nferry_intentions_loaded %d\n", b2i(st.Loaded))
	fmt.Fprintf(w, "# HELP ferry_intentions_stale Whether the last fetch of intentions failed (decisions use the last known list).\n# TYPE ferry_intentions_stale gauge\nferry_intentions_stale %d\n", b2i(st.Failing))
	fmt.Fprintf(w, "# HELP ferry_intentions_fetch_errors_total Failed fetches of the destination's intentions.\n# TYPE ferry_intentions_fetch_errors_total counter\nferry_intentions_fetch_errors_total %d\n", st.FetchErrors)
	fmt.Fprintf(w, "# HELP ferry_intentions_updates_total Changes of the intentions in force.\n# TYPE ferry_intentions_updates_total counter\nferry_intentions_updates_total %d\n", st.Updates)
	if st.Loaded {
		fmt.Fprintf(w, "# HELP ferry_intentions_default_allow Whether connections no intention matches are allowed, by where that default came from (flag, agent, acl, unknown = not established, denied).\n# TYPE ferry_intentions_default_allow gauge\nferry_intentions_default_allow{source=%q} %d\n", st.DefaultSource, b2i(st.DefaultAllow))
	}
	fmt.Fprintf(w, "# HELP ferry_intentions_revoked_total Established connections closed because an intention change denied their source.\n# TYPE ferry_intentions_revoked_total counter\nferry_intentions_revoked_total %d\n", st.Revoked)
}

// catalogCollector publishes the catalog view's state.
type catalogCollector struct{ v *catalog.View }

func (c catalogCollector) WritePrometheus(w io.Writer) {
	st := c.v.Stats()
	ready := 0
	select {
	case <-c.v.Ready():
		ready = 1
	default:
	}
	fmt.Fprintf(w, "# HELP ferry_catalog_ready Whether the catalog view (with the mesh entry) has loaded once; outbound connections are refused until then.\n# TYPE ferry_catalog_ready gauge\nferry_catalog_ready %d\n", ready)
	fmt.Fprintf(w, "# HELP ferry_catalog_address_conflicts Addresses claimed by more than one mesh service; connections to them are refused.\n# TYPE ferry_catalog_address_conflicts gauge\nferry_catalog_address_conflicts %d\n", st.Conflicts)
	fmt.Fprintf(w, "# HELP ferry_catalog_ignored_claims Virtual or instance address claims ignored (outside -virtual-cidr, or another service's consul-virtual).\n# TYPE ferry_catalog_ignored_claims gauge\nferry_catalog_ignored_claims %d\n", st.IgnoredClaims)
	fmt.Fprintf(w, "# HELP ferry_catalog_bulk_reads_total Full reads of the catalog's node listing.\n# TYPE ferry_catalog_bulk_reads_total counter\nferry_catalog_bulk_reads_total %d\n", st.BulkReads)
}
