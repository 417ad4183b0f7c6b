package testkit

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"sync"
	"testing"
)

// PatternReader yields N deterministic bytes (a function of the offset
// and Seed) without allocating per read.
type PatternReader struct {
	N, off int64
	Seed   byte
}

func (r *PatternReader) Read(p []byte) (int, error) {
	if r.off >= r.N {
		return 0, io.EOF
	}
	if int64(len(p)) > r.N-r.off {
		p = p[:r.N-r.off]
	}
	for i := range p {
		p[i] = byte(r.off+int64(i)) ^ r.Seed
	}
	r.off += int64(len(p))
	return len(p), nil
}

// PatternSum is the SHA-256 of n pattern bytes of seed.
func PatternSum(n int64, seed byte) [32]byte {
	h := sha256.New()
	io.Copy(h, &PatternReader{N: n, Seed: seed})
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// CheckPattern reads r to EOF and reports (t.Error: callable from any
// goroutine) unless it got exactly the n pattern bytes of seed.
func CheckPattern(t testing.TB, r io.Reader, n int64, seed byte) {
	t.Helper()
	h := sha256.New()
	m, err := io.Copy(h, r)
	if err != nil || m != n {
		t.Errorf("received %d bytes, %v; want %d", m, err, n)
	}
	if want := PatternSum(n, seed); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Error("checksum mismatch")
	}
}

// ExchangeBothWays sends n pattern bytes each way at once (client seed 1,
// server seed 2), half-closing after each, and checks what arrives.
func ExchangeBothWays(t testing.TB, client, server *net.TCPConn, n int64) {
	t.Helper()
	var wg sync.WaitGroup
	send := func(c *net.TCPConn, seed byte) {
		defer wg.Done()
		if _, err := io.Copy(c, &PatternReader{N: n, Seed: seed}); err != nil {
			t.Error(err)
		}
		c.CloseWrite()
	}
	recv := func(c *net.TCPConn, seed byte) {
		defer wg.Done()
		CheckPattern(t, c, n, seed)
	}
	wg.Add(4)
	go send(client, 1)
	go send(server, 2)
	go recv(server, 1)
	go recv(client, 2)
	wg.Wait()
}
