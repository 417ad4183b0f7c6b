// Package mtlstest generates throwaway Consul-like CAs and leaf
// certificates for tests: a root (optionally with an intermediate),
// service leaves with a SPIFFE URI SAN and clientAuth+serverAuth EKU, and
// ready-made mtls.Identity values. For tests only: no production package
// imports it (internal/archtest checks it).
package mtlstest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/mtls"
)

// KeyType selects the key algorithm of a CA or leaf.
type KeyType int

const (
	EC256 KeyType = iota // Consul's default
	EC384
	RSA2048
)

func (k KeyType) String() string {
	return [...]string{"ec256", "ec384", "rsa2048"}[k]
}

func newKey(t testing.TB, k KeyType) crypto.Signer {
	t.Helper()
	var (
		s   crypto.Signer
		err error
	)
	switch k {
	case EC256:
		s, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case EC384:
		s, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		s, err = rsa.GenerateKey(rand.Reader, 2048)
	default:
		t.Fatalf("mtlstest: unknown key type %d", k)
	}
	if err != nil {
		t.Fatalf("mtlstest: generate %s key: %v", k, err)
	}
	return s
}

// CA is a test certificate authority.
type CA struct {
	TrustDomain string
	Datacenter  string
	Root        *x509.Certificate
	RootPEM     []byte
	// signer and signerCert sign leaves: the root itself, or an
	// intermediate whose PEM is appended to every leaf's CertPEM.
	signer       crypto.Signer
	signerCert   *x509.Certificate
	intermediate []byte
}

// Options for NewCAWith.
type Options struct {
	KeyType      KeyType
	TrustDomain  string // default: a random "<uuid>.consul"
	Datacenter   string // default "dc1"
	Intermediate bool   // sign leaves with an intermediate sent in the leaf chain
}

// NewCA returns an EC P-256 CA with a random trust domain, datacenter dc1.
func NewCA(t testing.TB) *CA { return NewCAWith(t, Options{}) }

// NewCAWith returns a CA built from o.
func NewCAWith(t testing.TB, o Options) *CA {
	t.Helper()
	if o.TrustDomain == "" {
		o.TrustDomain = randomUUID(t) + ".consul"
	}
	if o.Datacenter == "" {
		o.Datacenter = "dc1"
	}
	key := newKey(t, o.KeyType)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "Test CA " + o.TrustDomain[:8]},
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: o.TrustDomain}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	root := create(t, tmpl, tmpl, key.Public(), key)
	ca := &CA{
		TrustDomain: o.TrustDomain, Datacenter: o.Datacenter,
		Root: root, RootPEM: pemCert(root), signer: key, signerCert: root,
	}
	if o.Intermediate {
		ikey := newKey(t, o.KeyType)
		itmpl := *tmpl
		itmpl.SerialNumber = serial(t)
		itmpl.Subject = pkix.Name{CommonName: "Test intermediate " + o.TrustDomain[:8]}
		inter := create(t, &itmpl, root, ikey.Public(), key)
		ca.signer, ca.signerCert, ca.intermediate = ikey, inter, pemCert(inter)
	}
	return ca
}

// ID returns the SPIFFE ID this CA's cluster gives service (default
// namespace and partition, the CA's datacenter).
func (ca *CA) ID(service string) mtls.SpiffeID {
	return mtls.ServiceID(ca.TrustDomain, ca.Datacenter, service)
}

// LeafOptions adjust a leaf; the zero value gives a Consul-like leaf valid
// from a minute ago for 72h.
type LeafOptions struct {
	NotBefore, NotAfter time.Time
	EKU                 []x509.ExtKeyUsage // default clientAuth + serverAuth
	NoURI               bool               // omit the URI SAN
	URI                 string             // raw URI SAN instead of id.String()
}

// Leaf issues a leaf for id with a new key of type k and returns CertPEM
// (leaf, then the intermediate if any, as Consul's agent returns it) and
// PrivateKeyPEM.
func (ca *CA) Leaf(t testing.TB, id mtls.SpiffeID, k KeyType) (certPEM, keyPEM []byte) {
	return ca.LeafWith(t, id, k, LeafOptions{})
}

// LeafWith is Leaf with options.
func (ca *CA) LeafWith(t testing.TB, id mtls.SpiffeID, k KeyType, o LeafOptions) (certPEM, keyPEM []byte) {
	t.Helper()
	key := newKey(t, k)
	now := time.Now()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-time.Minute)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = now.Add(72 * time.Hour)
	}
	if o.EKU == nil {
		o.EKU = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		NotBefore:    o.NotBefore,
		NotAfter:     o.NotAfter,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment |
			x509.KeyUsageKeyAgreement | x509.KeyUsageDataEncipherment,
		ExtKeyUsage:           o.EKU,
		BasicConstraintsValid: true,
	}
	if !o.NoURI {
		u := id.URL()
		if o.URI != "" {
			var err error
			if u, err = url.Parse(o.URI); err != nil {
				t.Fatalf("mtlstest: leaf URI: %v", err)
			}
		}
		tmpl.URIs = []*url.URL{u}
	}
	leaf := create(t, tmpl, ca.signerCert, key.Public(), ca.signer)
	certPEM = append(pemCert(leaf), ca.intermediate...)
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatalf("mtlstest: marshal key: %v", err)
	}
	if ec, ok := key.(*ecdsa.PrivateKey); ok { // Consul sends "EC PRIVATE KEY"
		if der, err = x509.MarshalECPrivateKey(ec); err != nil {
			t.Fatalf("mtlstest: marshal key: %v", err)
		}
		return certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// Identity returns a ready identity for service, with a leaf of type k
// issued by ca and ca's root (plus extraRoots) trusted.
func (ca *CA) Identity(t testing.TB, service string, k KeyType, extraRoots ...*CA) *mtls.Identity {
	t.Helper()
	id := mtls.NewIdentity()
	c, key := ca.Leaf(t, ca.ID(service), k)
	if err := id.SetLeaf(c, key); err != nil {
		t.Fatalf("mtlstest: %v", err)
	}
	roots := [][]byte{ca.RootPEM}
	for _, o := range extraRoots {
		roots = append(roots, o.RootPEM)
	}
	if err := id.SetRoots(ca.TrustDomain, roots...); err != nil {
		t.Fatalf("mtlstest: %v", err)
	}
	return id
}

func create(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatalf("mtlstest: create certificate: %v", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("mtlstest: parse certificate: %v", err)
	}
	return c
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		t.Fatalf("mtlstest: serial: %v", err)
	}
	return n.Add(n, big.NewInt(1))
}

func randomUUID(t testing.TB) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("mtlstest: uuid: %v", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
