package proxy

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// Per-connection cost through a Proxy (inbound, plain) vs direct: each op
// dials, sends 1 byte, half-closes and reads the echo. Allocations are the
// whole process's (client and echo server included); the proxy's share is
// the difference between the two benchmarks.
//
//	go test -run '^$' -bench 'Conn' -benchtime 2000x ./proxy
func BenchmarkConnDirect(b *testing.B) {
	app := testkit.EchoServer(b)
	benchConns(b, app)
}

func BenchmarkConnProxy(b *testing.B) {
	app := testkit.EchoServer(b)
	p := New(Config{IdleTimeout: time.Minute})
	if err := p.Apply(Endpoints{Inbound: "127.0.0.1:0", Outbound: "127.0.0.1:0", LocalApp: app}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	in, _ := p.Addrs()
	benchConns(b, in.String())
}

func benchConns(b *testing.B, addr string) {
	one := []byte{1}
	buf := make([]byte, 8)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Write(one)
		c.(*net.TCPConn).CloseWrite()
		if n, err := io.ReadFull(c, buf[:1]); n != 1 {
			b.Fatal(err)
		}
		c.Close()
	}
}
