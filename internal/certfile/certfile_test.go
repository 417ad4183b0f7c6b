package certfile

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

var localhost = net.IPv4(127, 0, 0, 1)

// writeAt writes b to path with modification time mod, so a rewrite within
// the file system's timestamp granularity is still seen as a change.
func writeAt(t *testing.T, path string, b []byte, mod time.Time) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, mod, mod); err != nil {
		t.Fatal(err)
	}
}

// serve accepts TLS connections with cfg and completes each handshake;
// it returns the address.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.(*tls.Conn).Handshake()
				c.Write([]byte("x"))
			}()
		}
	}()
	return ln.Addr().String()
}

// dial completes a TLS 1.3 handshake and reads the server's byte (in TLS
// 1.3 a client certificate the server rejects fails the first read).
func dial(addr string, roots *x509.CertPool, certs ...tls.Certificate) (serial int64, err error) {
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	if len(certs) > 0 {
		// Sent whatever CAs the server names: Go's client would otherwise
		// send no certificate at all rather than one of another CA.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &certs[0], nil }
	}
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != nil {
		return 0, err
	}
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64(), nil
}

// TestServerConfigClientCertificates: with a CA bundle, a client without a
// certificate or with one from the bundle is served; one from another CA
// is refused; a CA added to the bundle's directory is trusted on the next
// handshake, and the server certificate rotates in place.
func TestServerConfigClientCertificates(t *testing.T) {
	dir := t.TempDir()
	serverCA, clientCA, otherCA := testkit.NewCA(t, "server ca"), testkit.NewCA(t, "client ca"), testkit.NewCA(t, "other ca")
	cf, kf := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	t0 := time.Now().Add(-time.Minute)
	c1, k1 := serverCA.LeafPEM(t, 1, localhost)
	writeAt(t, cf, c1, t0)
	writeAt(t, kf, k1, t0)
	caDir := filepath.Join(dir, "cas")
	if err := os.Mkdir(caDir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeAt(t, filepath.Join(caDir, "client.pem"), clientCA.PEM, t0)

	cert := &Reloader{CertFile: cf, KeyFile: kf}
	cas := &CAPool{Path: caDir}
	if err := cert.Load(); err != nil {
		t.Fatal(err)
	}
	if err := cas.Load(); err != nil {
		t.Fatal(err)
	}
	addr := serve(t, ServerConfig(cert, cas))
	roots := x509.NewCertPool()
	roots.AddCert(serverCA.Cert)

	if s, err := dial(addr, roots); err != nil || s != 1 {
		t.Errorf("no client certificate: serial %d, %v; want served", s, err)
	}
	if _, err := dial(addr, roots, clientCA.Leaf(t, 7, localhost)); err != nil {
		t.Errorf("client certificate from the bundle: %v", err)
	}
	if _, err := dial(addr, roots, otherCA.Leaf(t, 8, localhost)); err == nil {
		t.Errorf("client certificate from another CA was accepted")
	}

	// The other CA joins the bundle (a new file in the directory).
	writeAt(t, filepath.Join(caDir, "other.pem"), otherCA.PEM, t0.Add(time.Second))
	if _, err := dial(addr, roots, otherCA.Leaf(t, 9, localhost)); err != nil {
		t.Errorf("after the other CA joined the bundle: %v", err)
	}

	// The server certificate rotates.
	c2, k2 := serverCA.LeafPEM(t, 2, localhost)
	writeAt(t, cf, c2, t0.Add(10*time.Second))
	writeAt(t, kf, k2, t0.Add(10*time.Second))
	if s, err := dial(addr, roots); err != nil || s != 2 {
		t.Errorf("after rotation: serial %d, %v; want 2", s, err)
	}
}

// TestCAPoolErrors: a missing path and a bundle without a certificate are
// errors at Load; a bundle broken later keeps the previous one.
func TestCAPoolErrors(t *testing.T) {
	dir := t.TempDir()
	if err := (&CAPool{Path: filepath.Join(dir, "missing.pem")}).Load(); err == nil {
		t.Error("missing file: no error")
	}
	empty := filepath.Join(dir, "empty.pem")
	writeAt(t, empty, []byte("not a certificate"), time.Now())
	if err := (&CAPool{Path: empty}).Load(); err == nil {
		t.Error("no PEM certificate: no error")
	}
	good := filepath.Join(dir, "ca.pem")
	writeAt(t, good, testkit.NewCA(t, "ca").PEM, time.Now().Add(-time.Minute))
	p := &CAPool{Path: good}
	first, err := p.Pool()
	if err != nil {
		t.Fatal(err)
	}
	writeAt(t, good, []byte("broken"), time.Now())
	if again, err := p.Pool(); err != nil || again != first {
		t.Errorf("broken bundle: %v, same pool %v; want the previous pool kept", err, again == first)
	}
}
