package mergedmetrics

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Server serves Handler on Path at the address Apply gives it, moving
// when the address changes.
type Server struct {
	path string
	h    http.Handler
	log  hclog.Logger
	tls  *tls.Config

	mu     sync.Mutex
	closed bool
	addr   string
	srv    *http.Server
	ln     net.Listener
	done   chan struct{}
}

// NewServer returns a Server listening nowhere until Apply; with tlsCfg
// it serves HTTPS only (consul-dataplane's -telemetry-prom-cert-file).
func NewServer(path string, cfg Config, tlsCfg *tls.Config, log hclog.Logger) *Server {
	if path == "" {
		path = "/metrics"
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Server{path: path, h: Handler(cfg), log: log, tls: tlsCfg}
}

// Apply listens on addr ("" stops listening).
func (s *Server) Apply(addr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("merged metrics: closed")
	}
	if addr == s.addr && (addr == "" || s.srv != nil) {
		return nil
	}
	s.stopLocked()
	s.addr = addr
	if addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("merged metrics: listen %s: %w", addr, err)
	}
	if s.tls != nil {
		ln = tls.NewListener(ln, s.tls)
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+s.path, s.h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: s.log.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("merged metrics listener failed", "error", err)
		}
	}()
	s.srv, s.ln, s.done = srv, ln, done
	s.log.Info("merged metrics listening", "addr", ln.Addr(), "path", s.path, "tls", s.tls != nil)
	return nil
}

// Addr is the bound address (nil when not listening).
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

func (s *Server) stopLocked() {
	if s.srv != nil {
		s.srv.Close()
		<-s.done
		s.srv, s.ln, s.done = nil, nil, nil
	}
}

// Close stops listening; idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.stopLocked()
	return nil
}
