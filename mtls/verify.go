package mtls

import (
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"
)

// verifyCacheMax bounds the per-root-set cache of successful chain
// verifications; when full it is simply emptied (a mesh has few distinct
// peer leaves, so this is rare and only costs re-verification).
const verifyCacheMax = 4096

type verifyKey struct {
	sum [sha256.Size]byte
	eku x509.ExtKeyUsage
}

type verifyWindow struct{ notBefore, notAfter time.Time }

// verifyCache remembers chains that verified against one root set, with
// the window in which every certificate of the verified chain is valid.
// Resumed handshakes present the same chain again, so they are re-checked
// against the current roots (a new root set starts with an empty cache)
// and the current time without paying for signature checks again.
type verifyCache struct {
	mu sync.Mutex
	m  map[verifyKey]verifyWindow
}

func newVerifyCache() *verifyCache { return &verifyCache{m: make(map[verifyKey]verifyWindow)} }

func chainKey(chain []*x509.Certificate, eku x509.ExtKeyUsage) verifyKey {
	h := sha256.New()
	var l [4]byte
	for _, c := range chain {
		n := len(c.Raw)
		l[0], l[1], l[2], l[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
		h.Write(l[:])
		h.Write(c.Raw)
	}
	k := verifyKey{eku: eku}
	h.Sum(k.sum[:0])
	return k
}

// verify checks that chain[0] chains to one of the roots (chain[1:] are
// untrusted intermediates sent by the peer), is valid at now and carries
// eku. It returns chain[0].
func (r *Roots) verify(chain []*x509.Certificate, eku x509.ExtKeyUsage, now time.Time) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("no certificate presented")
	}
	leaf := chain[0]
	var key verifyKey
	if r.verified != nil {
		key = chainKey(chain, eku)
		r.verified.mu.Lock()
		w, ok := r.verified.m[key]
		r.verified.mu.Unlock()
		if ok && !now.Before(w.notBefore) && !now.After(w.notAfter) {
			return leaf, nil
		}
	}
	opts := x509.VerifyOptions{
		Roots:       r.Pool,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{eku},
	}
	if len(chain) > 1 {
		opts.Intermediates = x509.NewCertPool()
		for _, c := range chain[1:] {
			opts.Intermediates.AddCert(c)
		}
	}
	chains, err := leaf.Verify(opts)
	if err != nil {
		return nil, fmt.Errorf("certificate %s not trusted: %w", describeCert(leaf), err)
	}
	if r.verified != nil {
		w := verifyWindow{notBefore: leaf.NotBefore, notAfter: leaf.NotAfter}
		for _, c := range chains[0] {
			if c.NotBefore.After(w.notBefore) {
				w.notBefore = c.NotBefore
			}
			if c.NotAfter.Before(w.notAfter) {
				w.notAfter = c.NotAfter
			}
		}
		r.verified.mu.Lock()
		if len(r.verified.m) >= verifyCacheMax {
			clear(r.verified.m)
		}
		r.verified.m[key] = w
		r.verified.mu.Unlock()
	}
	return leaf, nil
}

func describeCert(c *x509.Certificate) string {
	if len(c.URIs) > 0 {
		return fmt.Sprintf("%q (serial %s)", c.URIs[0].String(), colonHex(c.SerialNumber.Bytes()))
	}
	return fmt.Sprintf("(no URI SAN, serial %s)", colonHex(c.SerialNumber.Bytes()))
}
