package dns

import (
	"net"
	"testing"

	"github.com/ferrymesh/ferry/internal/testkit"
	mdns "github.com/miekg/dns"
)

// TestServerListensOnBothLoopbacks: a server on one loopback also answers
// (UDP and TCP) on the other family's at the same port, where the IPv6
// rules DNAT a dual-stack pod's queries to ::1; other addresses are bound
// alone.
func TestServerListensOnBothLoopbacks(t *testing.T) {
	testkit.CheckLeaks(t)
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		l.Close()
	}
	for _, tc := range []struct{ addr, other string }{
		{"127.0.0.1:0", "::1"},
		{"[::1]:0", "127.0.0.1"},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			s := startServer(t, Config{Addr: tc.addr})
			_, port, _ := net.SplitHostPort(s.Addr())
			for _, addr := range []string{s.Addr(), net.JoinHostPort(tc.other, port)} {
				for _, netw := range []string{"udp", "tcp"} {
					r := query(t, netw, addr, "backend.virtual.consul.", mdns.TypeA, false)
					if len(r.Answer) != 1 || r.Answer[0].(*mdns.A).A.String() != "240.0.0.7" {
						t.Fatalf("%s %s: %v", netw, addr, r)
					}
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			c, err := net.Dial("tcp", net.JoinHostPort(tc.other, port))
			if err == nil {
				c.Close()
				t.Fatalf("[%s]:%s still accepts after Close", tc.other, port)
			}
		})
	}
	// Not a loopback: bound alone (the wildcard serves both families).
	s := startServer(t, Config{Addr: "0.0.0.0:0"})
	if len(s.servers) != 2 {
		t.Fatalf("%d servers for a wildcard address, want 2 (UDP, TCP)", len(s.servers))
	}
}
