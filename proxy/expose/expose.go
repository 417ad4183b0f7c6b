package expose

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Path is one exposed path (Consul's api.ExposePath).
type Path struct {
	ListenerPort  int
	Path          string
	LocalPathPort int
	// LocalAddress is the app's address (the registration's
	// LocalServiceAddress); default Config.LocalIP.
	LocalAddress string
	// Protocol is "http" (the default) or "http2" (h2c, both legs).
	Protocol string
	// AnyPath serves every path (Path is ignored): the listener of an
	// agent check exposed by Expose.Checks, whose original target
	// Consul's HTTP API does not give; Sources must then restrict it to
	// the agent.
	AnyPath bool
	// Sources, when set, are the only client addresses served; others
	// have their connection closed without an answer, as Envoy's filter
	// chain match on source ranges drops them.
	Sources []netip.Prefix
}

// Config configures a Server. Zero values get defaults.
type Config struct {
	// BindIP is the address the listeners bind; default 0.0.0.0 (the
	// kubelet probes the pod IP).
	BindIP string
	// LocalIP is the app's address; default 127.0.0.1.
	LocalIP string
	Logger  hclog.Logger
	// Listen opens a listener; default net.Listen with a context.
	Listen func(ctx context.Context, network, addr string) (net.Listener, error)
}

// Server holds the listeners of the current list of exposed paths.
type Server struct {
	cfg Config
	log hclog.Logger

	mu     sync.Mutex
	closed bool
	ports  map[int]*port
}

type port struct {
	sig  string
	ln   net.Listener
	srv  *http.Server
	trs  []*http.Transport
	done chan struct{}
}

// New returns a Server with no listeners; Apply opens them.
func New(cfg Config) *Server {
	if cfg.BindIP == "" {
		cfg.BindIP = "0.0.0.0"
	}
	if cfg.LocalIP == "" {
		cfg.LocalIP = "127.0.0.1"
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Listen == nil {
		cfg.Listen = func(ctx context.Context, network, addr string) (net.Listener, error) {
			var lc net.ListenConfig
			return lc.Listen(ctx, network, addr)
		}
	}
	return &Server{cfg: cfg, log: cfg.Logger, ports: map[int]*port{}}
}

// Apply makes the listeners match paths: ports no longer listed are
// closed, new ones opened, changed ones reopened. Entries without a
// listener port, path or local port are skipped (as Consul skips them).
// A port that cannot be opened is reported in the error; the others are
// still served, and the next Apply tries it again.
func (s *Server) Apply(paths []Path) error {
	want := map[int][]Path{}
	for _, p := range paths {
		if p.ListenerPort <= 0 || p.ListenerPort > 65535 || p.LocalPathPort <= 0 || p.LocalPathPort > 65535 || (!p.AnyPath && !strings.HasPrefix(p.Path, "/")) {
			s.log.Warn("ignoring exposed path", "listener_port", p.ListenerPort, "path", p.Path, "local_path_port", p.LocalPathPort)
			continue
		}
		want[p.ListenerPort] = append(want[p.ListenerPort], p)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("expose: server closed")
	}
	for n, cur := range s.ports {
		if ps, ok := want[n]; !ok || signature(ps) != cur.sig {
			cur.stop()
			delete(s.ports, n)
			s.log.Info("exposed path listener closed", "port", n)
		}
	}
	var errs []error
	for n, ps := range want {
		if _, ok := s.ports[n]; ok {
			continue
		}
		p, err := s.start(n, ps)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.ports[n] = p
		s.log.Info("exposed path listener open", "port", n, "paths", signature(ps))
	}
	return errors.Join(errs...)
}

// Addr returns the address of the listener on port n (nil if none).
func (s *Server) Addr(n int) net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.ports[n]; p != nil {
		return p.ln.Addr()
	}
	return nil
}

// Close closes every listener and the connections they serve; it is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for n, p := range s.ports {
		p.stop()
		delete(s.ports, n)
	}
	return nil
}

func signature(ps []Path) string {
	parts := make([]string, 0, len(ps))
	for _, p := range ps {
		parts = append(parts, fmt.Sprintf("%s->%s:%d/%s%v", routeKey(p), p.LocalAddress, p.LocalPathPort, protocol(p), p.Sources))
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// routeKey is the path a route matches; "*" is every path.
func routeKey(p Path) string {
	if p.AnyPath {
		return "*"
	}
	return p.Path
}

func protocol(p Path) string {
	if strings.EqualFold(p.Protocol, "http2") {
		return "http2"
	}
	return "http"
}

func (s *Server) start(n int, ps []Path) (*port, error) {
	addr := net.JoinHostPort(s.cfg.BindIP, strconv.Itoa(n))
	ln, err := s.cfg.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("expose: listen %s: %w", addr, err)
	}
	routes := map[string]http.Handler{}
	var trs []*http.Transport
	h2 := false
	for _, p := range ps {
		key := routeKey(p)
		if _, dup := routes[key]; dup {
			continue // first one wins, as a route table would
		}
		h, tr := s.forwarder(p)
		if len(p.Sources) > 0 {
			h = onlyFrom(p.Sources, h)
		}
		routes[key] = h
		trs = append(trs, tr)
		h2 = h2 || protocol(p) == "http2"
	}
	log := s.log.With("port", n)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// Exact path only: the query string is in r.URL.RawQuery,
			// not in Path; no prefix, no cleaning.
			h, ok := routes[r.URL.Path]
			if !ok {
				h, ok = routes["*"]
			}
			if !ok {
				http.NotFound(w, r)
				return
			}
			h.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug}),
	}
	if h2 {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	p := &port{sig: signature(ps), ln: ln, srv: srv, trs: trs, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("exposed path listener failed", "error", err)
		}
	}()
	return p, nil
}

// onlyFrom serves h to clients in sources and drops the others'
// connections unanswered.
func onlyFrom(sources []netip.Prefix, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err == nil {
			for _, pfx := range sources {
				if pfx.Contains(ap.Addr().Unmap()) {
					h.ServeHTTP(w, r)
					return
				}
			}
		}
		panic(http.ErrAbortHandler)
	})
}

func (p *port) stop() {
	p.srv.Close()
	<-p.done
	for _, tr := range p.trs {
		tr.CloseIdleConnections()
	}
}

// forwarder is a reverse proxy to the app's LocalPathPort.
func (s *Server) forwarder(p Path) (http.Handler, *http.Transport) {
	ip := p.LocalAddress
	if ip == "" {
		ip = s.cfg.LocalIP
	}
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort(ip, strconv.Itoa(p.LocalPathPort))}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}
	if protocol(p) == "http2" {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	log := s.log.With("path", p.Path, "local_path_port", p.LocalPathPort)
	return &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.SetXForwarded()
		},
		Transport: tr,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			log.Debug("exposed path: app unreachable", "error", err)
			w.WriteHeader(http.StatusBadGateway)
		},
	}, tr
}
