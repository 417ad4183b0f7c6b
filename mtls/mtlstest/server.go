package mtlstest

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// Server is a real loopback TLS listener that handshakes every accepted
// connection, answers "ok" on success and reports each result, for tests
// of TLS configurations (real sockets: net.Pipe hides what matters).
type Server struct {
	Addr    string
	results chan ServerResult
}

// ServerResult is the server side of one handshake.
type ServerResult struct {
	State tls.ConnectionState
	Err   error
}

// StartServer serves cfg on 127.0.0.1 until the test ends.
func StartServer(t testing.TB, cfg *tls.Config) *Server {
	t.Helper()
	s := &Server{results: make(chan ServerResult, 64)}
	// One connection at a time: results come in the order of the dials.
	s.Addr = testkit.Serve(t, func(c net.Conn) {
		tc := tls.Server(c, cfg)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		err := tc.Handshake()
		if err == nil {
			_, err = tc.Write([]byte("ok"))
		}
		s.results <- ServerResult{tc.ConnectionState(), err}
		tc.Close()
	})
	return s
}

// Dial handshakes as a client and reads the server's "ok", so a client
// certificate rejected by a TLS 1.3 server (after the client's handshake
// returned) also surfaces as an error. It returns the server's result too.
func (s *Server) Dial(t testing.TB, cfg *tls.Config) (tls.ConnectionState, error, ServerResult) {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.Addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(c, cfg)
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	err = tc.Handshake()
	if err == nil {
		var b [2]byte
		if _, err = io.ReadFull(tc, b[:]); err == nil && string(b[:]) != "ok" {
			err = errors.New("bad greeting")
		}
		if err == nil {
			// Let the TLS 1.3 session ticket (sent after the
			// handshake) be processed before the connection closes.
			_ = tc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, _ = tc.Read(b[:])
		}
	}
	select {
	case r := <-s.results:
		return tc.ConnectionState(), err, r
	case <-time.After(5 * time.Second):
		t.Fatal("server did not report")
	}
	panic("unreachable")
}

// MustOK fails the test unless both sides of a Dial succeeded.
func MustOK(t testing.TB, cerr error, sr ServerResult) {
	t.Helper()
	if cerr != nil || sr.Err != nil {
		t.Fatalf("handshake failed: client: %v; server: %v", cerr, sr.Err)
	}
}
