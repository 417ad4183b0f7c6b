package tunnel

import (
	"crypto/tls"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// The tunnel protocol is agreed by ALPN, and ALPN can break a handshake:
// since Go 1.17 a Go TLS server with NextProtos aborts with
// no_application_protocol when the client offers protocols it does not
// serve, and a Go client does the same when the server picks one it did not
// offer. So each side offers or accepts ALPN only where that cannot
// break a peer: the server answers with it only to clients that offer it
// (ServerConfig), and the client retries once without ALPN when a
// server refuses it (proxy.MeshRouter.dialTLS), remembering that instance.

// ServerConfig makes base answer ALPN with the tunnel protocol (ALPN)
// to clients that offer it, and negotiate no ALPN at all with everybody else: an Envoy, a
// Consul built-in proxy or a connect-native service offering h2 sees the
// server it would see without ferry.
func ServerConfig(base *tls.Config) *tls.Config {
	tunnel := base.Clone()
	tunnel.NextProtos = []string{ALPN}
	cfg := base.Clone()
	cfg.NextProtos = nil
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(hello.SupportedProtos, ALPN) {
			return tunnel, nil
		}
		return nil, nil
	}
	return cfg
}

// WithoutALPN is cfg offering no ALPN protocol.
func WithoutALPN(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	c.NextProtos = nil
	return c
}

// IsNoALPN reports whether a handshake failed on the server's
// no_application_protocol alert (crypto/tls's alert type is unexported:
// the remote-error OpError and its text are what it exposes).
func IsNoALPN(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error" &&
		strings.Contains(op.Err.Error(), "no application protocol")
}

// AddrSet is a bounded set of addresses whose entries expire, so a peer
// that is upgraded (or replaced at the same address) is asked again.
type AddrSet struct {
	max int
	ttl time.Duration
	now func() time.Time

	mu sync.Mutex
	m  map[string]time.Time // address → added
}

func NewAddrSet(max int, ttl time.Duration) *AddrSet {
	return &AddrSet{max: max, ttl: ttl, now: time.Now, m: map[string]time.Time{}}
}

func (s *AddrSet) Add(addr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if len(s.m) >= s.max {
		for a, t := range s.m {
			if now.Sub(t) >= s.ttl {
				delete(s.m, a)
			}
		}
		if len(s.m) >= s.max {
			for a := range s.m { // full of live entries: drop any one
				delete(s.m, a)
				break
			}
		}
	}
	s.m[addr] = now
}

func (s *AddrSet) Has(addr string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.m[addr]
	if ok && s.now().Sub(t) >= s.ttl {
		delete(s.m, addr)
		return false
	}
	return ok
}
