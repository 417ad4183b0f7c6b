package proxy

import (
	"context"
	"net"
	"testing"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/listener"
)

// TestListenLoopbackPair: the outbound listener on one loopback also binds
// the other family's at the same port (the IPv6 REDIRECT goes to ::1); any
// other address is bound alone.
func TestListenLoopbackPair(t *testing.T) {
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		l.Close()
	}
	for _, tc := range []struct {
		addr string
		want []string // hosts, in order
	}{
		{"127.0.0.1:0", []string{"127.0.0.1", "::1"}},
		{"[::1]:0", []string{"::1", "127.0.0.1"}},
		{"0.0.0.0:0", []string{"::"}},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			ln, err := listenLoopbackPair(context.Background(), listenTCP, tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			addrs := listener.Addrs(ln)
			if len(addrs) != len(tc.want) {
				t.Fatalf("bound %v, want hosts %v", addrs, tc.want)
			}
			port := addrs[0].(*net.TCPAddr).Port
			for i, a := range addrs {
				ta := a.(*net.TCPAddr)
				if ta.IP.String() != tc.want[i] || ta.Port != port {
					t.Errorf("address %d = %v, want %s port %d", i, a, tc.want[i], port)
				}
				c, err := net.Dial("tcp", a.String())
				if err != nil {
					t.Fatalf("dial %v: %v", a, err)
				}
				s, err := ln.AcceptTCP()
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
				c.Close()
			}
		})
	}
}

// TestOutboundPassthroughIPv6: an app's IPv6 connection, redirected by an
// ip6tables REDIRECT (to ::1, the loopback of its family), reaches ferry's
// outbound listener configured as Consul configures it (127.0.0.1), and
// goes through to its original IPv6 destination, half-close included.
func TestOutboundPassthroughIPv6(t *testing.T) {
	testkit.CheckLeaks(t)
	n := newNetnsEnv(t)
	n.run(t, "ip", "-6", "addr", "add", "2001:db8:251::1/128", "dev", "lo")
	p, dial, dst := n.redirectedProxy(t, Config{}, "[2001:db8:251::1]:7000", "ip6tables", "2001:db8:251::/64", "127.0.0.1:1")
	got, err := dialExchange(t, dial, dst, "over IPv6 through ferry")
	if err != nil || got != "over IPv6 through ferry" {
		t.Fatalf("IPv6 passthrough: %q, %v", got, err)
	}
	testkit.Eventually(t, "outbound ok", func() bool { return counter(p, "outbound", "ok") == 1 })
}

// TestOutboundDirectIPv6IsLoop: a connection made straight to the [::1]
// companion (not redirected: no original destination) is refused as a
// loop, as on 127.0.0.1; it never becomes a passthrough to itself.
func TestOutboundDirectIPv6IsLoop(t *testing.T) {
	testkit.CheckLeaks(t)
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		l.Close()
	}
	p := startProxy(t, Config{}, "127.0.0.1:1")
	_, out := p.Addrs()
	_, port, _ := net.SplitHostPort(out.String())
	// The reset may already beat the dial's completion on loopback.
	if c, err := net.Dial("tcp", net.JoinHostPort("::1", port)); err == nil {
		got, _ := exchangeOn(c, "x")
		c.Close()
		if got != "" {
			t.Fatalf("received %q from a direct connection", got)
		}
	}
	testkit.Eventually(t, "loop counted", func() bool { return counter(p, "outbound", "loop") == 1 })
}
