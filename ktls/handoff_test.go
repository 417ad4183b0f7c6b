package ktls

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// readRawRecord reads one TLS record off the wire.
func readRawRecord(t testing.TB, c net.Conn) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatalf("read record header: %v", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(c, body); err != nil {
		t.Fatalf("read record body: %v", err)
	}
	return append(hdr, body...)
}

// openRecord decrypts a TLS 1.3 AES-GCM record the way RFC 8446 5.2-5.3
// says, independently of crypto/tls and the kernel: nonce = iv XOR seq,
// additional data = the record header. It returns the inner content type
// and the content.
func openRecord(key, iv []byte, seq uint64, rec []byte) (byte, []byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return 0, nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return 0, nil, err
	}
	nonce := append([]byte{}, iv...)
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], seq)
	for i := range s {
		nonce[4+i] ^= s[i]
	}
	pt, err := aead.Open(nil, nonce, rec[5:], rec[:5])
	if err != nil {
		return 0, nil, fmt.Errorf("open record at seq %d: %w", seq, err)
	}
	i := len(pt) - 1
	for i >= 0 && pt[i] == 0 {
		i--
	}
	if i < 0 {
		return 0, nil, errors.New("record without content type")
	}
	return pt[i], pt[:i], nil
}

// TestHandoffSequenceNumbers proves, in user space, the sequence numbers
// Enable gives the kernel, against what crypto/tls really sends: after a
// handoff-prepared mTLS handshake, each side's first application record
// (sent here by crypto/tls itself) is read raw off the socket (the cork
// left it there) and opened with keys derived from the receiver's own key
// log at the sequence number Enable would use: the client's at 0, the
// server's at the number of tickets it sent, and a ticket, when sent,
// sits at 0 as a NewSessionTicket.
func TestHandoffSequenceNumbers(t *testing.T) {
	pki := newTestPKI(t)
	for _, tc := range []struct {
		name          string
		allowTickets  bool
		clientCache   bool
		wantTickets   uint64
		getConfigHook bool
		noClientAuth  bool
	}{
		{name: "default", wantTickets: 0},
		{name: "tickets refused by default", clientCache: true, wantTickets: 0},
		{name: "tickets allowed, client resumes", allowTickets: true, clientCache: true, wantTickets: 1},
		{name: "tickets allowed, client does not resume", allowTickets: true, wantTickets: 0},
		{name: "GetConfigForClient", allowTickets: true, clientCache: true, wantTickets: 1, getConfigHook: true},
		// Without client auth the ticket goes out in the server's first
		// flight, in the same write as its Finished.
		{name: "ticket right behind Finished", allowTickets: true, clientCache: true, wantTickets: 1, noClientAuth: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctcp, stcp := tcpPair(t)
			// The server reads the client's last flight only once the client
			// has also sent data right behind its Finished: without the cork
			// crypto/tls would take that data in with the Finished.
			gate := &gatedConn{TCPConn: stcp, open: make(chan struct{})}
			hc, hs := NewHandoff(ctcp, nil), NewHandoff(stcp, gate)
			hs.AllowTickets = tc.allowTickets
			ccfg := pki.clientConfig()
			if tc.clientCache {
				ccfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			}
			scfg := pki.serverConfig()
			if tc.noClientAuth {
				scfg.ClientAuth = tls.NoClientCert
			}
			if tc.getConfigHook {
				inner := scfg.Clone()
				scfg = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return inner, nil }}
			}
			cc, sc := hc.Client(ccfg), hs.Server(scfg)
			errc := make(chan error, 1)
			go func() { errc <- sc.Handshake() }()
			if err := cc.Handshake(); err != nil {
				t.Fatal(err)
			}
			if _, err := cc.Write([]byte("from client")); err != nil {
				t.Fatal(err)
			}
			close(gate.open)
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if got := hs.tickets.Load(); got != tc.wantTickets {
				t.Fatalf("server counted %d tickets, want %d", got, tc.wantTickets)
			}
			if !hc.cork.atBoundary() || !hs.cork.atBoundary() {
				t.Fatal("a cork is not at a record boundary after the handshake")
			}
			if _, err := sc.Write([]byte("from server")); err != nil {
				t.Fatal(err)
			}
			s, err := suiteFor(cc.ConnectionState().CipherSuite)
			if err != nil {
				t.Fatal(err)
			}

			// Server RX: the client's first record at 0.
			clientSecret, _, err := hs.keys.get()
			if err != nil {
				t.Fatal(err)
			}
			key, iv, _ := trafficKeys(s, clientSecret)
			typ, body, err := openRecord(key, iv, 0, readRawRecord(t, stcp))
			if err != nil || typ != recordApplicationData || string(body) != "from client" {
				t.Fatalf("server RX at 0: type %d %q %v", typ, body, err)
			}

			// Client RX: a ticket at 0 if one was sent, then the server's
			// first data record at the server's TX sequence.
			_, serverSecret, err := hc.keys.get()
			if err != nil {
				t.Fatal(err)
			}
			key, iv, _ = trafficKeys(s, serverSecret)
			txSeq := hs.tickets.Load()
			for seq := range txSeq {
				typ, body, err := openRecord(key, iv, seq, readRawRecord(t, ctcp))
				if err != nil || typ != recordHandshake || len(body) == 0 || body[0] != msgNewSessionTicket {
					t.Fatalf("record %d: type %d, %v; want a NewSessionTicket", seq, typ, err)
				}
			}
			rec := readRawRecord(t, ctcp)
			typ, body, err = openRecord(key, iv, txSeq, rec)
			if err != nil || typ != recordApplicationData || string(body) != "from server" {
				t.Fatalf("client RX at %d: type %d %q %v", txSeq, typ, body, err)
			}
			if txSeq > 0 { // the same record must not open at 0: the check has teeth
				if _, _, err := openRecord(key, iv, 0, rec); err == nil {
					t.Fatal("the server's data record also opens at 0")
				}
			}
		})
	}
}

// On a kernel without kTLS (this build machine), Enable refuses before
// the kernel touches the socket, and both sides go on in user space, with
// the bytes the client sent right after its handshake intact.
func TestHandoffFallsBackWithoutKernelTLS(t *testing.T) {
	if Supported() {
		t.Skip("kernel TLS is available here; TestKernelHandoffRefused covers fallback")
	}
	pki := newTestPKI(t)
	ctcp, stcp := tcpPair(t)
	hc, hs := NewHandoff(ctcp, nil), NewHandoff(stcp, nil)
	cc, sc := hc.Client(pki.clientConfig()), hs.Server(pki.serverConfig())
	handshake(t, cc, sc)
	early := []byte("sent before the server tried the handoff")
	if _, err := cc.Write(early); err != nil {
		t.Fatal(err)
	}
	for _, side := range []struct {
		h  *Handoff
		tc *tls.Conn
	}{{hs, sc}, {hc, cc}} {
		k, err := side.h.Enable(side.tc)
		if k != nil || err == nil {
			t.Fatal("Enable succeeded without kernel TLS")
		}
		if !CanFallBack(err) {
			t.Fatalf("Enable: %v: not a fallback", err)
		}
		if !errors.Is(err, syscall.ENOENT) || !strings.Contains(err.Error(), "TCP_ULP") {
			t.Logf("Enable: %v (expected ENOENT from TCP_ULP on a kernel without the tls module)", err)
		}
		if _, err := side.h.Enable(side.tc); err == nil || CanFallBack(err) {
			t.Fatalf("second Enable: %v", err)
		}
	}
	got := make([]byte, len(early))
	if _, err := io.ReadFull(sc, got); err != nil || !bytes.Equal(got, early) {
		t.Fatalf("server read %q %v", got, err)
	}
	exchange(t, cc, sc, 4<<20)
}

// exchange sends n pseudo-random bytes each way at once and checks them
// by SHA-256, then half-closes a→b and b→a and checks both ends see EOF.
func exchange(t testing.TB, a, b net.Conn, n int64) {
	t.Helper()
	errc := make(chan error, 4)
	send := func(w net.Conn, seed byte) {
		// Large plain reads and writes: under UML every syscall is slow.
		_, err := io.CopyBuffer(writerOnly{w}, io.LimitReader(newPattern(seed), n), make([]byte, 256<<10))
		if err == nil {
			err = closeWrite(w)
		}
		errc <- err
	}
	recv := func(r net.Conn, seed byte) {
		h := sha256.New()
		got, err := io.CopyBuffer(h, readerOnly{r}, make([]byte, 256<<10))
		if err == nil && got != n {
			err = fmt.Errorf("received %d bytes, want %d", got, n)
		}
		if err == nil {
			w := sha256.New()
			io.Copy(w, io.LimitReader(newPattern(seed), n))
			if !bytes.Equal(h.Sum(nil), w.Sum(nil)) {
				err = errors.New("checksum mismatch")
			}
		}
		errc <- err
	}
	_ = a.SetDeadline(time.Now().Add(2 * time.Minute))
	_ = b.SetDeadline(time.Now().Add(2 * time.Minute))
	go send(a, 1)
	go send(b, 2)
	go recv(b, 1)
	go recv(a, 2)
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

func closeWrite(c net.Conn) error {
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.CloseWrite(); err != nil {
			return err
		}
		return tc.NetConn().(interface{ CloseWrite() error }).CloseWrite()
	}
	return c.(interface{ CloseWrite() error }).CloseWrite()
}

// pattern is a cheap deterministic byte stream (xorshift), so both ends
// can checksum without holding the data.
type pattern struct{ x uint64 }

func newPattern(seed byte) *pattern { return &pattern{x: 0x9e3779b97f4a7c15 ^ uint64(seed)} }

func (p *pattern) Read(b []byte) (int, error) {
	for i := 0; i+8 <= len(b); i += 8 {
		p.x ^= p.x << 13
		p.x ^= p.x >> 7
		p.x ^= p.x << 17
		binary.LittleEndian.PutUint64(b[i:], p.x)
	}
	n := len(b) &^ 7
	if n == 0 {
		return 0, nil
	}
	return n, nil
}

type writerOnly struct{ io.Writer }

// gatedConn holds reads back, once the server has written its flight,
// until open is closed.
type gatedConn struct {
	*net.TCPConn
	open  chan struct{}
	wrote atomic.Bool
}

func (c *gatedConn) Read(p []byte) (int, error) {
	if c.wrote.Load() {
		<-c.open
	}
	return c.TCPConn.Read(p)
}

func (c *gatedConn) Write(p []byte) (int, error) {
	c.wrote.Store(true)
	return c.TCPConn.Write(p)
}
