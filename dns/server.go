package dns

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	mdns "github.com/miekg/dns"
)

// Server is the sidecar's DNS server (UDP and TCP on one address).
type Server struct {
	cfg       Config
	log       hclog.Logger
	recursors *forwarder // nil when there are none
	consul    *forwarder // nil when ConsulDNS is empty
	cache     *cache     // nil when disabled
	nonce     []byte
	dcView    datacenterView // nil unless Mesh has one and Datacenter is unset
	sem       chan struct{}

	flightMu sync.Mutex
	flights  map[cacheKey]*flight
	waiting  atomic.Int64 // queries waiting on a flight; bounded like sem
	stats    counters

	// ctx is cancelled by Close and ends pending upstream exchanges.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	started  bool
	closed   bool
	addr     string
	servers  []*mdns.Server
	closeErr error
	wg       sync.WaitGroup
	stopped  chan struct{} // closed by Close; ends the ctx watcher
	closeEnd chan struct{} // closed when the first Close has finished
}

// New checks cfg and returns a server that is not listening yet.
// A recursor equal to the listen address is dropped: it would be a loop.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.Named("dns")
	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)

	var recs []string
	for _, r := range cfg.Recursors {
		if r == cfg.Addr {
			log.Warn("ignoring recursor: it is our own address", "recursor", r)
			continue
		}
		recs = append(recs, r)
	}
	cfg.Recursors = recs
	if cfg.ConsulDNS == cfg.Addr {
		log.Warn("ignoring Consul DNS address: it is our own address", "addr", cfg.ConsulDNS)
		cfg.ConsulDNS = ""
	}

	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg:      cfg,
		log:      log,
		cache:    newCache(cfg.CacheSize, cfg.CacheMaxTTL, cfg.CacheNegativeTTL, time.Now),
		nonce:    nonce,
		sem:      make(chan struct{}, cfg.MaxInflight),
		flights:  make(map[cacheKey]*flight),
		ctx:      ctx,
		cancel:   cancel,
		addr:     cfg.Addr,
		stopped:  make(chan struct{}),
		closeEnd: make(chan struct{}),
	}
	if dv, ok := cfg.Mesh.(datacenterView); ok {
		s.dcView = dv
	}
	if len(recs) > 0 {
		s.recursors = newForwarder(recs, cfg.UpstreamTimeout, nonce)
	}
	var consul []string
	for _, a := range append([]string{cfg.ConsulDNS}, cfg.ConsulDNSMore...) {
		if a != "" && a != cfg.Addr {
			consul = append(consul, a)
		}
	}
	if len(consul) > 0 {
		s.consul = newForwarder(consul, cfg.UpstreamTimeout, nonce)
	}
	return s, nil
}

// Start binds UDP and TCP and serves in the background until ctx ends or
// Close is called. It returns once both sockets accept queries.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("dns: start: server closed")
	}
	if s.started {
		return errors.New("dns: start: already started")
	}
	socks, err := listenDualStack(s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("dns: listen %s: %w", s.cfg.Addr, err)
	}
	s.started = true
	s.addr = socks[0].pc.LocalAddr().String()
	var addrs []string
	for _, sk := range socks {
		addrs = append(addrs, sk.pc.LocalAddr().String())
	}

	ready := make(chan struct{}, 2*len(socks))
	notify := func() { ready <- struct{}{} }
	idle := s.cfg.TCPIdleTimeout
	for _, sk := range socks {
		udp := &mdns.Server{
			PacketConn:        sk.pc,
			Handler:           s,
			UDPSize:           4096, // bigger queries are garbage; they fail to parse
			MsgAcceptFunc:     acceptQuery,
			NotifyStartedFunc: notify,
		}
		tcp := &mdns.Server{
			Listener:          sk.ln,
			Handler:           s,
			MsgAcceptFunc:     acceptQuery,
			NotifyStartedFunc: notify,
			ReadTimeout:       idle,
			WriteTimeout:      idle,
			IdleTimeout:       func() time.Duration { return idle },
		}
		s.servers = append(s.servers, udp, tcp)
	}
	for _, srv := range s.servers {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := srv.ActivateAndServe(); err != nil {
				s.log.Error("serve stopped", "net", srv.Net, "error", err)
			}
		}()
	}
	for range s.servers {
		<-ready
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-ctx.Done():
			go s.Close() // Close waits for this goroutine
		case <-s.stopped:
		}
	}()
	s.log.Info("serving DNS", "addr", addrs, "recursors", s.cfg.Recursors, "consul_dns", s.cfg.ConsulDNS, "consul_dns_more", s.cfg.ConsulDNSMore,
		"cluster_domain", s.cfg.ClusterDomain)
	return nil
}

// Addr is the bound address once started (useful with port 0), else the
// configured one.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Close stops serving, ends pending upstream exchanges and waits (at most
// a few seconds) for the handlers. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		// The first Close may still be shutting down (the ctx watcher
		// runs one of its own): wait for its end, then take its result.
		<-s.closeEnd
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.closeErr
	}
	s.closed = true
	close(s.stopped)
	s.cancel()
	servers := s.servers
	s.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var errs []error
	for _, srv := range servers {
		if err := srv.ShutdownContext(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	s.wg.Wait()
	err := errors.Join(errs...)
	if err != nil {
		err = fmt.Errorf("dns: close: %w", err)
	}
	s.mu.Lock()
	s.closeErr = err
	s.mu.Unlock()
	close(s.closeEnd)
	return err
}

// acceptQuery is miekg's default filter, except that NOTIFY (which we do
// not serve) is refused as not implemented up front.
func acceptQuery(dh mdns.Header) mdns.MsgAcceptAction {
	if opcode := int(dh.Bits>>11) & 0xF; opcode == mdns.OpcodeNotify {
		if dh.Bits&(1<<15) != 0 {
			return mdns.MsgIgnore
		}
		return mdns.MsgRejectNotImplemented
	}
	return mdns.DefaultMsgAcceptFunc(dh)
}

// listenBoth binds UDP and TCP on the same address; with port 0 it finds
// a port free for both.
func listenBoth(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	for attempt := 0; ; attempt++ {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, err
		}
		bound := net.JoinHostPort(host, fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port))
		ln, err := net.Listen("tcp", bound)
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		if port != "0" || attempt >= 20 {
			return nil, nil, err
		}
	}
}
