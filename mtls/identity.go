package mtls

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Leaf is one loaded leaf certificate with what was parsed out of it.
type Leaf struct {
	Cert      *tls.Certificate // Certificate[0] is the leaf, then any intermediates
	X509      *x509.Certificate
	Chain     []*x509.Certificate // X509 followed by the parsed intermediates
	ID        SpiffeID            // first URI SAN
	Serial    string              // colon-separated hex, as Consul reports it
	NotBefore time.Time
	NotAfter  time.Time
	gen       uint64 // identity-local load counter; keys resumable sessions
}

// Roots is one loaded set of CA roots. All roots are trusted: during a CA
// rotation the old and the new root are both listed and peers may still
// present leaves from either.
type Roots struct {
	TrustDomain string
	Pool        *x509.CertPool
	Certs       []*x509.Certificate
	verified    *verifyCache // results are only valid for this root set
	gen         uint64
}

// Identity is the service's mesh identity: the current leaf and CA roots.
// Both are swapped atomically; TLS configs from ServerConfig and
// ClientConfig read them on every handshake, so an update takes effect on
// the next handshake without rebuilding listeners or configs. All methods
// are safe for concurrent use.
type Identity struct {
	leaf  atomic.Pointer[Leaf]
	roots atomic.Pointer[Roots]

	gen       atomic.Uint64 // bumped on every leaf or roots load
	ready     chan struct{}
	readyOnce sync.Once

	mu       sync.Mutex
	leafErr  error // last leaf fetch/load error, nil after a success
	rootsErr error
}

// NewIdentity returns an empty identity; it becomes ready once SetLeaf and
// SetRoots (or Watch) have both succeeded.
func NewIdentity() *Identity {
	return &Identity{ready: make(chan struct{})}
}

// Ready is closed once a leaf and roots have both been loaded. It stays
// closed; use Status for the current state.
func (id *Identity) Ready() <-chan struct{} { return id.ready }

// Leaf returns the current leaf, or nil before the first one is loaded.
func (id *Identity) Leaf() *Leaf { return id.leaf.Load() }

// Roots returns the current roots, or nil before they are loaded.
func (id *Identity) Roots() *Roots { return id.roots.Load() }

// Generation changes whenever a leaf or a root set is loaded. A session
// made under another generation was verified against other trust (or
// presents another certificate): callers that keep sessions around use it
// to stop reusing them.
func (id *Identity) Generation() uint64 { return id.gen.Load() }

// ID returns the SPIFFE ID of the current leaf (zero before it is loaded).
// Its Datacenter is the datacenter of the agent that issued the leaf.
func (id *Identity) ID() SpiffeID {
	if l := id.leaf.Load(); l != nil {
		return l.ID
	}
	return SpiffeID{}
}

// TrustDomain returns the trust domain reported with the roots, falling
// back to the leaf's, or "" before either is loaded.
func (id *Identity) TrustDomain() string {
	if r := id.roots.Load(); r != nil && r.TrustDomain != "" {
		return r.TrustDomain
	}
	return id.ID().TrustDomain
}

// SetLeaf parses and installs a leaf. certPEM holds the leaf followed by
// any intermediates (all are sent to peers); keyPEM its private key (EC or
// RSA, any PEM form crypto/tls accepts). The leaf must carry a service
// SPIFFE ID as its first URI SAN.
func (id *Identity) SetLeaf(certPEM, keyPEM []byte) error {
	l, err := ParseLeaf(certPEM, keyPEM)
	id.mu.Lock()
	id.leafErr = err
	id.mu.Unlock()
	if err != nil {
		return err
	}
	l.gen = id.gen.Add(1)
	id.leaf.Store(l)
	id.checkReady()
	return nil
}

// ParseLeaf parses a leaf certificate chain and key as Consul issues them.
func ParseLeaf(certPEM, keyPEM []byte) (*Leaf, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("mtls: load leaf: %w", err)
	}
	x := cert.Leaf
	if x == nil { // X509KeyPair fills Leaf since Go 1.23; keep working if x509keypairleaf=0
		if x, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("mtls: load leaf: %w", err)
		}
		cert.Leaf = x
	}
	chain := []*x509.Certificate{x}
	for i, der := range cert.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("mtls: load leaf: intermediate %d: %w", i+1, err)
		}
		chain = append(chain, c)
	}
	if len(x.URIs) == 0 {
		return nil, errors.New("mtls: load leaf: certificate has no URI SAN")
	}
	sid, err := SpiffeIDFromURL(x.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("mtls: load leaf: %w", err)
	}
	return &Leaf{
		Cert: &cert, X509: x, Chain: chain, ID: sid, Serial: colonHex(x.SerialNumber.Bytes()),
		NotBefore: x.NotBefore, NotAfter: x.NotAfter,
	}, nil
}

// SetRoots installs a new root set built from every PEM certificate in
// rootPEMs (each entry may hold several). trustDomain is the TrustDomain
// of Consul's roots response.
func (id *Identity) SetRoots(trustDomain string, rootPEMs ...[]byte) error {
	r, err := ParseRoots(trustDomain, rootPEMs...)
	id.mu.Lock()
	id.rootsErr = err
	id.mu.Unlock()
	if err != nil {
		return err
	}
	r.gen = id.gen.Add(1)
	id.roots.Store(r)
	id.checkReady()
	return nil
}

// ParseRoots builds a root set; it fails if no certificate is found.
func ParseRoots(trustDomain string, rootPEMs ...[]byte) (*Roots, error) {
	r := &Roots{TrustDomain: trustDomain, Pool: x509.NewCertPool(), verified: newVerifyCache()}
	for i, p := range rootPEMs {
		for n := 0; ; n++ {
			var b *pem.Block
			b, p = pem.Decode(p)
			if b == nil {
				break
			}
			if b.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("mtls: load roots: root %d cert %d: %w", i, n, err)
			}
			r.Pool.AddCert(c)
			r.Certs = append(r.Certs, c)
		}
	}
	if len(r.Certs) == 0 {
		return nil, errors.New("mtls: load roots: no certificates")
	}
	return r, nil
}

func (id *Identity) checkReady() {
	if id.leaf.Load() != nil && id.roots.Load() != nil {
		id.readyOnce.Do(func() { close(id.ready) })
	}
}

// Status is a snapshot of the identity's health, e.g. for a /ready endpoint.
type Status struct {
	Ready      bool   // leaf and roots loaded and the leaf not expired
	Reason     string // why not Ready; "" when Ready
	LastError  string // most recent fetch/load error, even while Ready (stale data)
	ID         string // SPIFFE ID of the current leaf
	Serial     string
	NotAfter   time.Time
	RootCount  int
	LeafTrusts bool // the leaf chains to the current roots
}

// Status reports the current state and, when not ready, why.
func (id *Identity) Status() Status {
	id.mu.Lock()
	leafErr, rootsErr := id.leafErr, id.rootsErr
	id.mu.Unlock()
	l, r := id.leaf.Load(), id.roots.Load()
	var s Status
	var errs []string
	if leafErr != nil {
		errs = append(errs, "leaf: "+leafErr.Error())
	}
	if rootsErr != nil {
		errs = append(errs, "roots: "+rootsErr.Error())
	}
	s.LastError = strings.Join(errs, "; ")
	if l != nil {
		s.ID, s.Serial, s.NotAfter = l.ID.String(), l.Serial, l.NotAfter
	}
	if r != nil {
		s.RootCount = len(r.Certs)
	}
	switch {
	case l == nil && r == nil:
		s.Reason = "leaf certificate and CA roots not loaded yet"
	case l == nil:
		s.Reason = "leaf certificate not loaded yet"
	case r == nil:
		s.Reason = "CA roots not loaded yet"
	case !time.Now().Before(l.NotAfter):
		s.Reason = fmt.Sprintf("leaf certificate expired at %s", l.NotAfter.UTC().Format(time.RFC3339))
	}
	if l != nil && r != nil {
		_, err := r.verify(l.Chain, x509.ExtKeyUsageAny, time.Now())
		s.LeafTrusts = err == nil
	}
	if s.Reason != "" && s.LastError != "" {
		s.Reason += " (last error: " + s.LastError + ")"
	}
	s.Ready = s.Reason == ""
	return s
}

func colonHex(b []byte) string {
	const hexdigits = "0123456789abcdef"
	if len(b) == 0 {
		return "00"
	}
	out := make([]byte, 0, len(b)*3-1)
	for i, c := range b {
		if i > 0 {
			out = append(out, ':')
		}
		out = append(out, hexdigits[c>>4], hexdigits[c&0xf])
	}
	return string(out)
}
