package ktls

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// Records other than application data in the middle of the stream, as
// the kernel delivers them (EIO to read, EINVAL to splice): a ticket and
// user_canceled are skipped without losing a byte around them, on both
// the Read and the WriteTo (splice) paths; a KeyUpdate and a fatal alert
// end the stream with an error, never with a clean EOF.
func TestKernelControlRecordsMidStream(t *testing.T) {
	ticket := []byte{msgNewSessionTicket, 0, 0, 3, 1, 2, 3}
	for _, path := range []string{"Read", "WriteTo"} {
		t.Run("skipped via "+path, func(t *testing.T) {
			p := newTLSPair(t, pairOpts{client: kern, server: kern})
			tx, rx := p.server.(*Conn), p.client.(*Conn)
			steps := []func() error{
				// First, before any data: splice's first call fails, which
				// net takes for "splice not supported" and falls back to read.
				func() error { return tx.sendRecord(recordHandshake, ticket) },
				func() error { _, err := tx.Write([]byte("a")); return err },
				func() error { return tx.sendRecord(recordHandshake, ticket[:2]) }, // a ticket split over two records
				func() error { return tx.sendRecord(recordHandshake, ticket[2:]) },
				func() error { _, err := tx.Write([]byte("b")); return err },
				func() error { return tx.sendRecord(recordAlert, []byte{alertLevelWarning, alertUserCanceled}) },
				func() error { _, err := tx.Write([]byte("c")); return err },
				func() error { return tx.CloseWrite() },
			}
			for _, s := range steps {
				if err := s(); err != nil {
					t.Fatal(err)
				}
			}
			_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := readVia(t, path, rx)
			if err != nil || string(got) != "abc" {
				t.Fatalf("got %q, %v; want \"abc\", clean end", got, err)
			}
		})
	}
	for _, tc := range []struct {
		name string
		typ  byte
		body []byte
		want func(error) bool
	}{
		{"KeyUpdate", recordHandshake, []byte{msgKeyUpdate, 0, 0, 1, 0}, func(err error) bool { return errors.Is(err, ErrKeyUpdate) }},
		{"fatal alert", recordAlert, []byte{alertLevelFatal, 42}, func(err error) bool {
			var a AlertError
			var op *net.OpError
			return errors.As(err, &a) && a == 42 && errors.As(err, &op) && op.Op == "remote error"
		}},
		{"change_cipher_spec", recordChangeCipherSpec, []byte{1}, func(err error) bool { return err != nil }},
	} {
		for _, path := range []string{"Read", "WriteTo"} {
			t.Run(tc.name+" via "+path, func(t *testing.T) {
				p := newTLSPair(t, pairOpts{client: kern, server: kern})
				tx, rx := p.server.(*Conn), p.client.(*Conn)
				if _, err := tx.Write([]byte("before")); err != nil {
					t.Fatal(err)
				}
				if err := tx.sendRecord(tc.typ, tc.body); err != nil {
					t.Fatal(err)
				}
				tx.Write([]byte("after"))
				tx.CloseWrite()
				_ = rx.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := readVia(t, path, rx)
				if string(got) != "before" || !tc.want(err) {
					t.Fatalf("got %q, %v", got, err)
				}
				// The error is sticky and the peer was told.
				if _, err2 := rx.Read(make([]byte, 1)); !tc.want(err2) {
					t.Fatalf("second read: %v", err2)
				}
			})
		}
	}
}

// readVia reads k to its end by Read or by WriteTo into a TCP socket
// (splice); it returns the bytes and the error (nil for a clean end).
func readVia(t testing.TB, path string, k *Conn) ([]byte, error) {
	t.Helper()
	if path == "Read" {
		return io.ReadAll(k)
	}
	a, b := tcpPair(t)
	res := make(chan []byte, 1)
	go func() { got, _ := io.ReadAll(b); res <- got }()
	_, err := k.WriteTo(a)
	a.CloseWrite()
	return <-res, err
}

// Handoff refused: a TLS_TX the kernel rejects (after the ULP is on)
// leaves the connection to crypto/tls, and 4 MiB each way and the
// half-closes still work against a kernel peer; a rejected TLS_RX (TX
// already in the kernel) is reported as not recoverable.
func TestKernelHandoffRefused(t *testing.T) {
	badCipher := func(which int) func(int, []byte) []byte {
		return func(dir int, info []byte) []byte {
			if dir == which {
				info[2], info[3] = 0xff, 0xff
			}
			return info
		}
	}
	t.Run("TLS_TX", func(t *testing.T) {
		p := newTLSPair(t, pairOpts{client: kern, server: kern, mangleServer: badCipher(tlsTX)})
		if !CanFallBack(p.serverErr) {
			t.Fatalf("server Enable: %v, want a fallback", p.serverErr)
		}
		t.Logf("refused as expected: %v", p.serverErr)
		exchange(t, p.client, p.server, 4<<20) // p.server is still the *tls.Conn
	})
	t.Run("TLS_RX", func(t *testing.T) {
		p := newTLSPair(t, pairOpts{client: kern, server: kern, mangleServer: badCipher(tlsRX)})
		if p.serverErr == nil || CanFallBack(p.serverErr) {
			t.Fatalf("server Enable: %v, want an unrecoverable error", p.serverErr)
		}
	})
}

// A small send buffer and a slow reader: the kernel's non-blocking
// sendmsg returns short writes, which must still deliver every byte once.
func TestKernelSmallSendBufferSlowReader(t *testing.T) {
	p := newTLSPair(t, pairOpts{client: kern, server: user})
	if err := p.clientTCP.SetWriteBuffer(4096); err != nil {
		t.Fatal(err)
	}
	const n = 4 << 20
	go func() {
		io.Copy(p.client, io.LimitReader(newPattern(7), n))
		p.client.(*Conn).CloseWrite()
	}()
	_ = p.server.SetReadDeadline(time.Now().Add(2 * time.Minute))
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for i := 0; ; i++ {
		m, err := p.server.Read(buf)
		got.Write(buf[:m])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if i%128 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	want, _ := io.ReadAll(io.LimitReader(newPattern(7), n))
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("received %d bytes, differing from the %d sent", got.Len(), n)
	}
}

// Two sidecars' data path inside one kernel: app client -plain- sidecar A
// =kTLS= sidecar B -plain- app server, each sidecar splicing both ways
// (ReadFrom into its kTLS socket, WriteTo out of it), 64 MiB each way
// with checksums, and each app's half-close arriving at the other app as
// a clean EOF after all its bytes.
func TestKernelTwoSidecarSplicePath(t *testing.T) {
	p := newTLSPair(t, pairOpts{client: kern, server: kern})
	appClient, aPlain := tcpPair(t)
	bPlain, appServer := tcpPair(t)
	errc := make(chan error, 4)
	sidecar := func(plain *net.TCPConn, k *Conn) {
		go func() { // app → mesh
			_, err := k.ReadFrom(plain)
			if err == nil {
				err = k.CloseWrite()
			}
			errc <- err
		}()
		go func() { // mesh → app
			_, err := k.WriteTo(plain)
			if err == nil {
				err = plain.CloseWrite()
			}
			errc <- err
		}()
	}
	sidecar(aPlain, p.client.(*Conn))
	sidecar(bPlain, p.server.(*Conn))
	exchange(t, appClient, appServer, 64<<20)
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatalf("sidecar: %v", err)
		}
	}
}

// WriteBuffers (a tunnel's DATA header and payload in one writev) gives
// the peer exactly the bytes in order, across records, to crypto/tls and
// to a kernel peer; Buffered is 0 with nothing held from a control record.
func TestKernelWriteBuffers(t *testing.T) {
	for _, server := range []side{user, kern} {
		t.Run(sideName(server), func(t *testing.T) {
			p := newTLSPair(t, pairOpts{client: kern, server: server})
			k := p.client.(*Conn)
			var want []byte
			go func() {
				for i := range 4 {
					hdr := []byte{0, 1, 144, byte(i)}
					payload := bytes.Repeat([]byte{byte('a' + i)}, 100<<10+i)
					bufs := net.Buffers{hdr, payload}
					if _, err := k.WriteBuffers(&bufs); err != nil {
						t.Error(err)
						return
					}
				}
				k.CloseWrite()
			}()
			for i := range 4 {
				want = append(want, 0, 1, 144, byte(i))
				want = append(want, bytes.Repeat([]byte{byte('a' + i)}, 100<<10+i)...)
			}
			p.server.SetReadDeadline(time.Now().Add(20 * time.Second))
			got, err := io.ReadAll(p.server)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, %v; want the %d written, in order", len(got), err, len(want))
			}
			if n := k.Buffered(); n != 0 {
				t.Fatalf("Buffered %d; want 0", n)
			}
		})
	}
}
