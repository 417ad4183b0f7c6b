package testkit

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// SelfSignedTLS returns a server and a client config sharing one
// self-signed ECDSA certificate for the name "pump-test". For mesh
// identities (SPIFFE IDs, a CA with roots and leaves) use mtls/mtlstest.
func SelfSignedTLS(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "pump-test"},
		DNSNames:     []string{"pump-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	pair := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return &tls.Config{Certificates: []tls.Certificate{pair}},
		&tls.Config{RootCAs: pool, ServerName: "pump-test"}
}

// Handshake completes a TLS handshake between two ends of one connection.
func Handshake(t testing.TB, client, server *tls.Conn) {
	t.Helper()
	hs := make(chan error, 1)
	go func() { hs <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-hs; err != nil {
		t.Fatal(err)
	}
}

// TLSPair returns the two ends of a TLS connection over loopback TCP, with
// the handshake done; wrap (nil: none) sits between each end and its TCP
// conn, e.g. the pump's batching conn.
func TLSPair(t testing.TB, wrap func(*net.TCPConn) net.Conn) (client, server *tls.Conn) {
	t.Helper()
	srvCfg, cliCfg := SelfSignedTLS(t)
	rawClient, rawServer := TCPPair(t)
	var c, s net.Conn = rawClient, rawServer
	if wrap != nil {
		c, s = wrap(rawClient), wrap(rawServer)
	}
	client = tls.Client(c, cliCfg)
	server = tls.Server(s, srvCfg)
	Handshake(t, client, server)
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}
