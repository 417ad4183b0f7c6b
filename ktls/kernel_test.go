package ktls

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The tests in this file need a kernel with the tls module. They skip on
// this build machine and run under User-Mode Linux (test/uml), where
// FERRY_KTLS_REQUIRED turns a skip into a failure.

type side int

const (
	user side = iota // stays in crypto/tls (Abandon)
	kern             // handed to the kernel (Enable)
)

type pairOpts struct {
	client, server side
	allowTickets   bool // server AllowTickets, client with a session cache
	mangleServer   func(dir int, info []byte) []byte
	serverUnder    func(*net.TCPConn) net.Conn
	clientUnder    func(*net.TCPConn) net.Conn
}

type tlsPair struct {
	client, server       net.Conn // *Conn or *tls.Conn
	clientTCP, serverTCP *net.TCPConn
	serverErr            error // Enable's error on the server, if any
}

// newTLSPair runs an mTLS handshake through Handoffs on both ends and
// hands each end to the kernel or leaves it in user space.
func newTLSPair(t testing.TB, o pairOpts) *tlsPair {
	t.Helper()
	needKernel(t)
	pki := newTestPKI(t)
	ctcp, stcp := tcpPair(t)
	var cu, su net.Conn
	if o.clientUnder != nil {
		cu = o.clientUnder(ctcp)
	}
	if o.serverUnder != nil {
		su = o.serverUnder(stcp)
	}
	hc, hs := NewHandoff(ctcp, cu), NewHandoff(stcp, su)
	hs.AllowTickets = o.allowTickets
	hs.mangle = o.mangleServer
	ccfg := pki.clientConfig()
	if o.allowTickets {
		ccfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	}
	cc, sc := hc.Client(ccfg), hs.Server(pki.serverConfig())
	handshake(t, cc, sc)
	if v := cc.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("negotiated %s", tls.VersionName(v))
	}
	p := &tlsPair{client: cc, server: sc, clientTCP: ctcp, serverTCP: stcp}
	finish := func(s side, h *Handoff, tc *tls.Conn, dst *net.Conn) error {
		if s == user {
			h.Abandon()
			return nil
		}
		k, err := h.Enable(tc)
		if err != nil {
			return err
		}
		*dst = k
		return nil
	}
	if err := finish(o.client, hc, cc, &p.client); err != nil {
		t.Fatalf("client Enable: %v", err)
	}
	p.serverErr = finish(o.server, hs, sc, &p.server)
	if p.serverErr != nil && o.mangleServer == nil {
		t.Fatalf("server Enable: %v", p.serverErr)
	}
	t.Cleanup(func() { p.client.Close(); p.server.Close() })
	return p
}

func sideName(s side) string { return map[side]string{user: "user", kern: "kernel"}[s] }

// Interop with crypto/tls in both directions and kernel to kernel, mTLS:
// 64 MiB each way at once, checked by SHA-256, then half-close each way
// (close_notify + FIN) with the other direction still flowing.
func TestKernelInterop(t *testing.T) {
	for _, tc := range []struct {
		client, server side
		size           int64
	}{{kern, user, 64 << 20}, {user, kern, 64 << 20}, {kern, kern, 16 << 20}} {
		t.Run(sideName(tc.client)+"-"+sideName(tc.server), func(t *testing.T) {
			p := newTLSPair(t, pairOpts{client: tc.client, server: tc.server})
			exchange(t, p.client, p.server, tc.size)
		})
	}
}

// seqsOf reads a kernel end's sequence numbers.
func seqsOf(t testing.TB, c net.Conn) (tx, rx uint64) {
	t.Helper()
	tx, rx, err := c.(*Conn).sequences()
	if err != nil {
		t.Fatal(err)
	}
	return tx, rx
}

// The kernel's own record sequence numbers (getsockopt SOL_TLS) right
// after the handoff are the ones the handshake left, and they advance one
// per record: with a session ticket sent, the server starts TX at 1 and
// the kernel client reads the ticket at RX 0 (and skips it).
func TestKernelSequenceNumbers(t *testing.T) {
	for _, tickets := range []bool{false, true} {
		name := map[bool]string{false: "no ticket", true: "one ticket"}[tickets]
		t.Run(name, func(t *testing.T) {
			p := newTLSPair(t, pairOpts{client: kern, server: kern, allowTickets: tickets})
			var ticket uint64
			if tickets {
				ticket = 1
			}
			if tx, rx := seqsOf(t, p.server); tx != ticket || rx != 0 {
				t.Fatalf("server after handoff: tx %d rx %d, want %d 0", tx, rx, ticket)
			}
			if tx, rx := seqsOf(t, p.client); tx != 0 || rx != 0 {
				t.Fatalf("client after handoff: tx %d rx %d, want 0 0", tx, rx)
			}
			const records = 3
			for i := range records {
				msg := []byte{byte(i)}
				for _, d := range [][2]net.Conn{{p.client, p.server}, {p.server, p.client}} {
					if _, err := d[0].Write(msg); err != nil {
						t.Fatal(err)
					}
					got := make([]byte, 1)
					_ = d[1].SetReadDeadline(time.Now().Add(10 * time.Second))
					if _, err := io.ReadFull(d[1], got); err != nil || got[0] != msg[0] {
						t.Fatalf("read %v %v", got, err)
					}
				}
			}
			if tx, rx := seqsOf(t, p.server); tx != ticket+records || rx != records {
				t.Fatalf("server: tx %d rx %d, want %d %d", tx, rx, ticket+records, records)
			}
			if tx, rx := seqsOf(t, p.client); tx != records || rx != ticket+records {
				t.Fatalf("client: tx %d rx %d, want %d %d", tx, rx, records, ticket+records)
			}
		})
	}
}

// The same with a crypto/tls client, which checks every record's tag:
// the server's first kernel record must be at 1 after a ticket. Giving
// the kernel 0 instead (what ignoring the ticket would do, and an AES-GCM
// nonce reuse) is caught as a bad record MAC, so the check has teeth.
func TestKernelTicketSequenceAgainstCryptoTLS(t *testing.T) {
	for _, wrong := range []bool{false, true} {
		name := map[bool]string{false: "counted", true: "ticket ignored"}[wrong]
		t.Run(name, func(t *testing.T) {
			o := pairOpts{client: user, server: kern, allowTickets: true}
			if wrong {
				o.mangleServer = func(dir int, info []byte) []byte {
					if dir == tlsTX {
						clear(info[len(info)-recSeqSize:])
					}
					return info
				}
			}
			p := newTLSPair(t, o)
			if p.serverErr != nil {
				t.Fatal(p.serverErr)
			}
			if _, err := p.server.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 5)
			_ = p.client.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.ReadFull(p.client, got)
			switch {
			case !wrong && (err != nil || string(got) != "hello"):
				t.Fatalf("client read %q %v", got, err)
			case wrong && (err == nil || !strings.Contains(err.Error(), "bad record MAC")):
				t.Fatalf("with the ticket ignored the client read %q, %v; want bad record MAC", got, err)
			}
		})
	}
}

// A kernel-sealed record opens in user space with the key, IV and
// sequence number Enable gave the kernel, for both key sizes: an
// independent check of the crypto_info layout (Go peers always pick
// AES-128, so AES-256 is only exercised here).
func TestKernelRecordsOpenInUserSpace(t *testing.T) {
	needKernel(t)
	for _, id := range []uint16{tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384} {
		t.Run(tls.CipherSuiteName(id), func(t *testing.T) {
			s, _ := suiteFor(id)
			a, b := tcpPair(t)
			tx, rx := make([]byte, s.hash().Size()), make([]byte, s.hash().Size())
			rand.Read(tx)
			rand.Read(rx)
			k, err := enableRaw(a, s, tx, rx)
			if err != nil {
				t.Fatal(err)
			}
			key, iv, _ := trafficKeys(s, tx)
			for seq := range uint64(3) {
				msg := []byte{'m', byte('0' + seq)}
				if _, err := k.Write(msg); err != nil {
					t.Fatal(err)
				}
				typ, body, err := openRecord(key, iv, seq, readRawRecord(t, b))
				if err != nil || typ != recordApplicationData || !bytes.Equal(body, msg) {
					t.Fatalf("record %d: type %d %q %v", seq, typ, body, err)
				}
			}
		})
	}
}

// eofConn notes whether a read met the TCP stream's end, to tell a
// close_notify (crypto/tls stops at it) from a bare FIN.
type eofConn struct {
	*net.TCPConn
	sawEOF bool
}

func (c *eofConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if err == io.EOF {
		c.sawEOF = true
	}
	return n, err
}

// Half-close from the kernel end sends close_notify before the FIN (the
// crypto/tls peer's io.EOF comes from the alert); close_notify from a
// crypto/tls peer is io.EOF for Read and WriteTo (splice), a FIN without
// it ErrTruncated, and the other direction keeps working in each case.
func TestKernelHalfClose(t *testing.T) {
	t.Run("kernel sends close_notify", func(t *testing.T) {
		var under *eofConn
		p := newTLSPair(t, pairOpts{client: kern, server: user, serverUnder: func(c *net.TCPConn) net.Conn {
			under = &eofConn{TCPConn: c}
			return under
		}})
		if err := p.client.(*Conn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = p.server.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := p.server.Read(make([]byte, 10)); n != 0 || err != io.EOF {
			t.Fatalf("server read %d %v, want io.EOF", n, err)
		}
		if under.sawEOF {
			t.Fatal("crypto/tls reached the FIN: no close_notify came first")
		}
		if _, err := p.client.Write([]byte("x")); err == nil {
			t.Fatal("write after CloseWrite succeeded")
		}
		if _, err := p.server.Write([]byte("still open")); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 10)
		_ = p.client.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(p.client, got); err != nil || string(got) != "still open" {
			t.Fatalf("client read %q %v", got, err)
		}
	})
	for _, how := range []string{"close_notify", "FIN only"} {
		for _, path := range []string{"Read", "WriteTo"} {
			t.Run("peer "+how+" via "+path, func(t *testing.T) {
				p := newTLSPair(t, pairOpts{client: kern, server: user})
				if _, err := p.server.Write([]byte("data")); err != nil {
					t.Fatal(err)
				}
				var err error
				if how == "close_notify" {
					err = p.server.(*tls.Conn).CloseWrite() // the alert only: no FIN
				} else {
					err = p.serverTCP.CloseWrite()
				}
				if err != nil {
					t.Fatal(err)
				}
				k := p.client.(*Conn)
				_ = k.SetReadDeadline(time.Now().Add(10 * time.Second))
				var got []byte
				if path == "Read" {
					got, err = io.ReadAll(k) // ReadAll turns io.EOF into nil
				} else {
					a, b := tcpPair(t)
					_, err = k.WriteTo(a)
					a.CloseWrite()
					got, _ = io.ReadAll(b)
				}
				if string(got) != "data" {
					t.Fatalf("got %q", got)
				}
				want := error(nil)
				if how == "FIN only" {
					want = ErrTruncated
				}
				if !errors.Is(err, want) || (want == nil && err != nil) {
					t.Fatalf("err %v, want %v", err, want)
				}
				if _, err := k.Write([]byte("reply")); err != nil {
					t.Fatal(err)
				}
				got = make([]byte, 5)
				_ = p.server.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(p.server, got); err != nil || string(got) != "reply" {
					t.Fatalf("server read %q %v", got, err)
				}
			})
		}
	}
}

// A reset stays a reset in both directions.
func TestKernelReset(t *testing.T) {
	t.Run("peer resets", func(t *testing.T) {
		p := newTLSPair(t, pairOpts{client: kern, server: user})
		p.serverTCP.SetLinger(0)
		p.serverTCP.Close()
		_ = p.client.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := p.client.Read(make([]byte, 10))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read %v, want ECONNRESET", err)
		}
	})
	t.Run("kernel end resets", func(t *testing.T) {
		p := newTLSPair(t, pairOpts{client: kern, server: user})
		p.clientTCP.SetLinger(0)
		p.clientTCP.Close() // under the TLS layer: no close_notify
		p.client.Close()
		_ = p.server.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := p.server.Read(make([]byte, 10))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read %v, want ECONNRESET", err)
		}
	})
}
