package mtls_test

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"testing"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
)

// benchServer accepts on loopback, handshakes with cfg and writes one
// byte, so the client also consumes the TLS 1.3 session ticket.
func benchServer(b *testing.B, cfg *tls.Config) string {
	return testkit.Serve(b, func(c net.Conn) {
		go func() {
			tc := tls.Server(c, cfg)
			if tc.Handshake() == nil {
				_, _ = tc.Write([]byte{1})
				_, _ = tc.Read(make([]byte, 1)) // wait for the client's close
			}
			tc.Close()
		}()
	})
}

// BenchmarkHandshake measures one complete mutual-TLS connection setup
// over loopback TCP (both sides' CPU, in-process: TCP connect + handshake +
// first byte), full vs resumed, per leaf key type and key exchange.
//
//	go test -run XXX -bench Handshake -benchtime 1s ./mtls/
func BenchmarkHandshake(b *testing.B) {
	curves := []struct {
		name string
		ids  []tls.CurveID
	}{
		{"p256", []tls.CurveID{tls.CurveP256}},
		{"x25519", []tls.CurveID{tls.X25519}},
		{"x25519mlkem768", []tls.CurveID{tls.X25519MLKEM768}},
	}
	for _, kt := range []mtlstest.KeyType{mtlstest.EC256, mtlstest.RSA2048} {
		ca := mtlstest.NewCAWith(b, mtlstest.Options{KeyType: kt})
		web := ca.Identity(b, "web", kt)
		api := ca.Identity(b, "api", kt)
		for _, cv := range curves {
			for _, resumed := range []bool{false, true} {
				name := kt.String() + "/" + cv.name + "/full"
				if resumed {
					name = kt.String() + "/" + cv.name + "/resumed"
				}
				b.Run(name, func(b *testing.B) {
					scfg := api.ServerConfig()
					scfg.CurvePreferences = cv.ids
					addr := benchServer(b, scfg)
					ccfg := web.ClientConfig(ca.ID("api"))
					ccfg.CurvePreferences = cv.ids
					if !resumed {
						ccfg.ClientSessionCache = nil
					}
					var one [1]byte
					handshake := func() bool {
						c, err := net.Dial("tcp", addr)
						if err != nil {
							b.Fatal(err)
						}
						tc := tls.Client(c, ccfg)
						if err := tc.Handshake(); err != nil {
							b.Fatal(err)
						}
						if _, err := io.ReadFull(tc, one[:]); err != nil {
							b.Fatal(err)
						}
						r := tc.ConnectionState().DidResume
						tc.Close()
						return r
					}
					handshake() // prime the session cache
					b.ReportAllocs()
					b.ResetTimer()
					n := 0
					for b.Loop() {
						if handshake() {
							n++
						}
					}
					if resumed && n != b.N {
						b.Fatalf("%d of %d connections resumed", n, b.N)
					}
				})
			}
		}
	}
}

// BenchmarkBulk streams through one mutual-TLS connection over loopback
// (both sides' CPU in-process) and, for scale, through plain TCP.
//
//	go test -run XXX -bench Bulk -benchtime 2s ./mtls/
func BenchmarkBulk(b *testing.B) {
	const chunk = 32 << 10
	run := func(b *testing.B, dialer func() (io.WriteCloser, <-chan int64)) {
		w, got := dialer()
		buf := make([]byte, chunk)
		b.SetBytes(chunk)
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
			if _, err := w.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		w.Close()
		<-got
	}
	drain := func(c net.Conn, got chan<- int64) {
		n, _ := io.CopyBuffer(io.Discard, c, make([]byte, chunk))
		c.Close()
		got <- n
	}
	listen := func(b *testing.B) net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		return ln
	}

	b.Run("plain-tcp", func(b *testing.B) {
		run(b, func() (io.WriteCloser, <-chan int64) {
			ln := listen(b)
			got := make(chan int64, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				drain(c, got)
			}()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			return c, got
		})
	})
	for _, kt := range []mtlstest.KeyType{mtlstest.EC256} {
		ca := mtlstest.NewCAWith(b, mtlstest.Options{KeyType: kt})
		web := ca.Identity(b, "web", kt)
		api := ca.Identity(b, "api", kt)
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			b.Run("mtls-"+kt.String()+"-"+tls.VersionName(v), func(b *testing.B) {
				run(b, func() (io.WriteCloser, <-chan int64) {
					ln := listen(b)
					got := make(chan int64, 1)
					scfg := api.ServerConfig()
					go func() {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						drain(tls.Server(c, scfg), got)
					}()
					c, err := net.Dial("tcp", ln.Addr().String())
					if err != nil {
						b.Fatal(err)
					}
					ccfg := web.ClientConfig(ca.ID("api"))
					ccfg.MaxVersion = v
					tc := tls.Client(c, ccfg)
					if err := tc.Handshake(); err != nil {
						b.Fatal(err)
					}
					return tc, got
				})
			})
		}
	}
}

// BenchmarkChainVerify is the x509 chain check that the per-root-set
// verification cache saves on every handshake after a peer's first
// (per side): what a repeat or resumed connection would otherwise pay.
func BenchmarkChainVerify(b *testing.B) {
	for _, kt := range []mtlstest.KeyType{mtlstest.EC256, mtlstest.RSA2048} {
		b.Run(kt.String(), func(b *testing.B) {
			ca := mtlstest.NewCAWith(b, mtlstest.Options{KeyType: kt})
			web := ca.Identity(b, "web", kt)
			opts := x509.VerifyOptions{Roots: web.Roots().Pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
			leaf := web.Leaf().X509
			b.ReportAllocs()
			for b.Loop() {
				if _, err := leaf.Verify(opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
