package mtls

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// tls12Suites are used only when a peer cannot do TLS 1.3 (Envoy clients
// default to TLS 1.2): ECDHE + AEAD only, the same set Consul's built-in
// proxy offers, which also covers Envoy's defaults.
var tls12Suites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// Key-exchange groups are chosen in curves.go (with the reasoning).

// sessionCacheSize is the number of resumable sessions kept per upstream.
const sessionCacheSize = 64

// ServerConfig returns the inbound (public listener) config: TLS >= 1.2
// (1.3 when the client can), the current leaf via GetCertificate for any
// SNI, no ALPN, and a required client certificate verified in
// VerifyConnection against the current roots with EKU clientAuth. The
// client must present a service SPIFFE ID as its first URI SAN; who may
// connect is for the caller to decide with PeerID.
//
// VerifyConnection runs on resumed handshakes too, so a resumed session is
// checked against the roots of the moment. Tickets issued under an older
// root set are declined (full handshake instead of a failure).
func (id *Identity) ServerConfig() *tls.Config {
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS12,
		CipherSuites:     tls12Suites,
		CurvePreferences: serverCurves,
		// Go's own verification would pin the roots at config creation;
		// VerifyConnection checks against the current ones instead.
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return id.currentCert()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if _, err := id.verifyPeer(cs, x509.ExtKeyUsageClientAuth); err != nil {
				return fmt.Errorf("mtls: client certificate: %w", err)
			}
			return nil
		},
		DynamicRecordSizingDisabled: true,
	}
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		if r := id.roots.Load(); r != nil {
			ss.Extra = append(ss.Extra, rootsMarker(r.gen))
		}
		return cfg.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := cfg.DecryptTicket(identity, cs)
		if err != nil || ss == nil {
			return ss, err
		}
		r := id.roots.Load()
		if r == nil || !hasMarker(ss.Extra, rootsMarker(r.gen)) {
			return nil, nil // stale ticket: fall back to a full handshake
		}
		return ss, nil
	}
	return cfg
}

const markerPrefix = "ferry-roots-gen:"

func rootsMarker(gen uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(markerPrefix), gen)
}

func hasMarker(extra [][]byte, m []byte) bool {
	for _, e := range extra {
		if string(e) == string(m) {
			return true
		}
	}
	return false
}

// ClientOption adjusts ClientConfig.
type ClientOption func(*clientOptions)

type clientOptions struct {
	lenient    bool
	serverName *string
	cacheSize  int
}

// WithLenientSANMatch accepts the server if its first URI SAN matches the
// expected ID the way Consul's built-in proxy compares it: trust domain
// ignored, the rest case-insensitive. The default is Envoy's rule (exact
// string equality), which interoperates with Envoy, the built-in proxy and
// ferry alike because all of them present Consul-issued leaves. Use this
// only when the exact trust domain or datacenter of the target cannot be
// known, e.g. to talk to a server whose leaf came from a federated or
// migrated CA with a different trust-domain spelling.
func WithLenientSANMatch() ClientOption { return func(o *clientOptions) { o.lenient = true } }

// WithServerName overrides the SNI (default: expected.SNI()). Use the
// catalog-provided SNI for peered or discovery-chain targets; "" sends none.
func WithServerName(sni string) ClientOption {
	return func(o *clientOptions) { o.serverName = &sni }
}

// WithSessionCacheSize sets how many sessions are kept for resumption
// (default 64); 0 disables resumption.
func WithSessionCacheSize(n int) ClientOption { return func(o *clientOptions) { o.cacheSize = n } }

// ClientConfig returns the outbound config for one upstream: TLS >= 1.2,
// the current leaf via GetClientCertificate, SNI expected.SNI(), and in
// VerifyConnection (full and resumed handshakes) a chain check against the
// current roots with EKU serverAuth plus the check that the server's first
// URI SAN is exactly expected.String(). It carries its own session cache,
// so call it once per upstream and reuse the result; use InstanceConfig per
// dial when the upstream has several instances.
func (id *Identity) ClientConfig(expected SpiffeID, opts ...ClientOption) *tls.Config {
	o := clientOptions{cacheSize: sessionCacheSize}
	for _, f := range opts {
		f(&o)
	}
	want := expected.String()
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS12,
		CipherSuites:     tls12Suites,
		CurvePreferences: clientCurves,
		ServerName:       expected.SNI(),
		// The SNI is not a certificate name; the chain and the SPIFFE ID
		// are verified in VerifyConnection against the current roots.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return id.currentCert()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf, err := id.verifyPeer(cs, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return fmt.Errorf("mtls: server certificate for %s: %w", want, err)
			}
			got := leaf.URIs[0]
			if o.lenient {
				gid, err := SpiffeIDFromURL(got)
				if err == nil && matchLenient(expected, gid) {
					return nil
				}
			} else if got.String() == want {
				return nil
			}
			return fmt.Errorf("mtls: server identity %q is not the expected %q", got.String(), want)
		},
		DynamicRecordSizingDisabled: true,
	}
	if o.serverName != nil {
		cfg.ServerName = *o.serverName
	}
	if o.cacheSize > 0 {
		cfg.ClientSessionCache = &sessionCache{id: id, inner: tls.NewLRUClientSessionCache(o.cacheSize)}
	}
	return cfg
}

// InstanceConfig returns a copy of a ClientConfig result whose resumable
// sessions are kept apart for the instance at addr. Go keys client sessions
// by SNI, which is the same for every instance of an upstream; without
// this, connections spread over instances would keep overwriting each
// other's sessions. The copy shares the upstream's bounded cache.
func InstanceConfig(cfg *tls.Config, addr string) *tls.Config {
	sc, ok := cfg.ClientSessionCache.(*sessionCache)
	if !ok {
		return cfg
	}
	c := cfg.Clone()
	c.ClientSessionCache = &sessionCache{id: sc.id, inner: sc.inner, prefix: sc.prefix + addr + "|"}
	return c
}

// sessionCache files sessions under the leaf and roots generations they
// were made with: after either changes, old sessions are no longer offered
// (the peer would re-verify a certificate that may no longer be trusted,
// failing the connection), so rotation costs one full handshake instead.
type sessionCache struct {
	id     *Identity
	inner  tls.ClientSessionCache
	prefix string
}

func (s *sessionCache) key(k string) string {
	var lg, rg uint64
	if l := s.id.leaf.Load(); l != nil {
		lg = l.gen
	}
	if r := s.id.roots.Load(); r != nil {
		rg = r.gen
	}
	b := make([]byte, 0, len(s.prefix)+len(k)+24)
	b = append(b, s.prefix...)
	b = append(b, k...)
	b = append(b, '|')
	b = strconv.AppendUint(b, lg, 36)
	b = append(b, '.')
	b = strconv.AppendUint(b, rg, 36)
	return string(b)
}

func (s *sessionCache) Get(k string) (*tls.ClientSessionState, bool) { return s.inner.Get(s.key(k)) }
func (s *sessionCache) Put(k string, cs *tls.ClientSessionState)     { s.inner.Put(s.key(k), cs) }

func (id *Identity) currentCert() (*tls.Certificate, error) {
	if l := id.leaf.Load(); l != nil {
		return l.Cert, nil
	}
	return nil, errors.New("mtls: no leaf certificate loaded yet")
}

// verifyPeer checks the peer chain against the current roots and that the
// leaf carries a URI SAN; it returns the peer leaf.
func (id *Identity) verifyPeer(cs tls.ConnectionState, eku x509.ExtKeyUsage) (*x509.Certificate, error) {
	r := id.roots.Load()
	if r == nil {
		return nil, errors.New("no CA roots loaded yet")
	}
	leaf, err := r.verify(cs.PeerCertificates, eku, time.Now())
	if err != nil {
		return nil, err
	}
	if len(leaf.URIs) == 0 {
		return nil, fmt.Errorf("certificate %s has no URI SAN", describeCert(leaf))
	}
	if _, err := SpiffeIDFromURL(leaf.URIs[0]); err != nil {
		return nil, err
	}
	return leaf, nil
}

// PeerID returns the SPIFFE ID of the peer, the first URI SAN of its leaf.
// Call it only on a connection whose handshake completed with a config from
// this package: the handshake has then verified that leaf.
func PeerID(cs tls.ConnectionState) (SpiffeID, error) {
	if !cs.HandshakeComplete {
		return SpiffeID{}, errors.New("mtls: peer ID: handshake not complete")
	}
	if len(cs.PeerCertificates) == 0 {
		return SpiffeID{}, errors.New("mtls: peer ID: no peer certificate")
	}
	leaf := cs.PeerCertificates[0]
	if len(leaf.URIs) == 0 {
		return SpiffeID{}, errors.New("mtls: peer ID: certificate has no URI SAN")
	}
	return SpiffeIDFromURL(leaf.URIs[0])
}
