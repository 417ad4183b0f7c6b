package proxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// checkLeaks fails the test if goroutines started during it are still
// running (after a bounded wait) when the test's other cleanups are done.
// Register it first so it runs last.
func checkLeaks(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(3 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:n])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// tcpPair returns the two ends of a fresh loopback TCP connection.
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- res{c, err}
	}()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { client.Close(); r.c.Close() })
	return client, r.c
}

// pumpRun is a Pump running in the background.
type pumpRun struct {
	done  chan struct{}
	stats PumpStats
}

// wait returns the stats once Pump has returned, failing after d.
func (r *pumpRun) wait(t testing.TB, d time.Duration) PumpStats {
	t.Helper()
	select {
	case <-r.done:
		return r.stats
	case <-time.After(d):
		t.Fatal("pump did not finish")
	}
	return PumpStats{}
}

// pumped sets up client <-> [a Pump b] <-> server over loopback and runs
// Pump in the background.
func pumped(t testing.TB, ctx context.Context, idle time.Duration) (client, server *net.TCPConn, run *pumpRun) {
	t.Helper()
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	return client, server, startPump(t, ctx, a, b, idle)
}

func startPump(t testing.TB, ctx context.Context, a, b net.Conn, idle time.Duration) *pumpRun {
	t.Helper()
	r := &pumpRun{done: make(chan struct{})}
	go func() {
		r.stats = Pump(ctx, a, b, idle)
		close(r.done)
	}()
	t.Cleanup(func() {
		a.Close()
		b.Close()
		select {
		case <-r.done:
		case <-time.After(5 * time.Second):
			t.Error("pump did not finish after both legs closed")
		}
	})
	return r
}

// readAllTimeout reads c to EOF, failing after d.
func readAllTimeout(t testing.TB, c net.Conn, d time.Duration) ([]byte, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	return io.ReadAll(c)
}

// patternReader yields n deterministic bytes without allocation per read.
type patternReader struct {
	n, off int64
	seed   byte
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n-r.off {
		p = p[:r.n-r.off]
	}
	for i := range p {
		p[i] = byte(r.off+int64(i)) ^ r.seed
	}
	r.off += int64(len(p))
	return len(p), nil
}

func patternSum(n int64, seed byte) [32]byte {
	h := sha256.New()
	io.Copy(h, &patternReader{n: n, seed: seed})
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func isClosedOrReset(err error) bool {
	return err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
		strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "broken pipe")
}

// selfSignedTLS returns a server and a client config sharing one
// self-signed ECDSA certificate.
func selfSignedTLS(t testing.TB) (server, client *tls.Config) {
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

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables)")
	}
}

// countingDiscard is an io.Writer that drops data; n is the atomic read
// counter copyBuffered wants.
type countingDiscard struct{ n atomic.Int64 }

func (c *countingDiscard) Write(p []byte) (int, error) { return len(p), nil }

// handshake completes a TLS handshake between two ends of one connection.
func handshake(tb testing.TB, client, server *tls.Conn) {
	tb.Helper()
	hs := make(chan error, 1)
	go func() { hs <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		tb.Fatal(err)
	}
	if err := <-hs; err != nil {
		tb.Fatal(err)
	}
}

// checkPattern reads r to EOF and reports (t.Error: callable from any
// goroutine) unless it got exactly the n pattern bytes of seed.
func checkPattern(t testing.TB, r io.Reader, n int64, seed byte) {
	t.Helper()
	h := sha256.New()
	m, err := io.Copy(h, r)
	if err != nil || m != n {
		t.Errorf("received %d bytes, %v; want %d", m, err, n)
	}
	if want := patternSum(n, seed); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Error("checksum mismatch")
	}
}

// exchangeBothWays sends n pattern bytes each way at once (client seed 1,
// server seed 2), half-closing after each, and checks what arrives.
func exchangeBothWays(t testing.TB, client, server *net.TCPConn, n int64) {
	t.Helper()
	var wg sync.WaitGroup
	send := func(c *net.TCPConn, seed byte) {
		defer wg.Done()
		if _, err := io.Copy(c, &patternReader{n: n, seed: seed}); err != nil {
			t.Error(err)
		}
		c.CloseWrite()
	}
	recv := func(c *net.TCPConn, seed byte) {
		defer wg.Done()
		checkPattern(t, c, n, seed)
	}
	wg.Add(4)
	go send(client, 1)
	go send(server, 2)
	go recv(server, 1)
	go recv(client, 2)
	wg.Wait()
}
