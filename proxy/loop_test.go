package proxy

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/hashicorp/go-hclog"
)

// unmarkedDialer dials from inside the namespace without the proxy mark,
// i.e. like ferry running under a UID the rules do not exempt, recording
// its sockets as the default dialer does.
type unmarkedDialer struct {
	n   *netnsEnv
	own *OwnSockets
}

func (d unmarkedDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := d.n.do(func() error {
		var err error
		c, err = d.own.Dialer(&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// When ferry's own passthrough dial is redirected back to its outbound
// listener (ferry's UID not exempted), the looped connection is reset as
// "loop" after one hop, logged once, and leaves no fds behind (audit F13).
// MaxConnections only bounds the damage should the check fail.
func TestOutboundRedirectLoopCutAfterOneHop(t *testing.T) {
	testkit.CheckLeaks(t)
	n := newNetnsEnv(t)
	own := NewOwnSockets()
	logs := &testkit.LogBuffer{}
	cfg := Config{OwnSockets: own, Dialer: unmarkedDialer{n, own}, MaxConnections: 50,
		Logger: hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: logs})}
	var p *Proxy
	if err := n.do(func() error {
		p = startProxy(t, cfg, "127.0.0.1:1")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	_, out := p.Addrs()
	_, port, _ := net.SplitHostPort(out.String())
	// No mark exemption at all: every connection to 198.18.251.0/24,
	// ferry's own included, goes to the outbound listener.
	n.run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "198.18.251.0/24", "-j", "REDIRECT", "--to-ports", port)

	fds := testkit.OpenFDs(t)
	for i := range 3 {
		// The app's connection fails: reset (maybe while connecting,
		// everything happens on loopback) or closed, with nothing received
		// (how the loop's reset reaches the app is the pump's business).
		var c net.Conn
		err := n.do(func() error {
			var err error
			c, err = net.Dial("tcp", "198.18.251.1:7000")
			return err
		})
		if err == nil {
			got, _ := exchangeOn(c, "x")
			c.Close()
			if got != "" {
				t.Fatalf("connection %d: received %q through a loop", i, got)
			}
		}
		testkit.Eventually(t, "loop counted", func() bool { return counter(p, "outbound", "loop") == int64(i+1) })
	}
	testkit.Eventually(t, "connections finished", func() bool { return p.Registry().Len() == 0 && p.outbound.Active() == 0 })
	// One hop each: the app's connection and ferry's looped one.
	total := int64(0)
	for _, o := range []string{"ok", "error", "idle_timeout", "closed", "dial_error", "rejected", "loop", "over_limit"} {
		total += counter(p, "outbound", o)
	}
	if total != 6 {
		t.Fatalf("%d outbound connections for 3 app connections, want 6 (one hop each)", total)
	}
	if n := counter(p, "outbound", "over_limit"); n != 0 {
		t.Fatalf("%d connections over the limit: the loop ran on", n)
	}
	if got := testkit.OpenFDs(t); got > fds+2 {
		t.Fatalf("open fds %d, %d before", got, fds)
	}
	if got := strings.Count(logs.String(), "redirect loop"); got != 1 {
		t.Fatalf("loop logged %d times, want once:\n%s", got, logs.String())
	}
	if !strings.Contains(logs.String(), "ferry runs as UID") {
		t.Fatalf("log does not say what is misconfigured:\n%s", logs.String())
	}
}

// OwnSockets recognizes a socket dialed through its Dialer by {source,
// destination}, from the moment it connects, and forgets it after the TTL.
func TestOwnSockets(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := addrPortOf(ln.Addr())
	own := NewOwnSockets()
	now := time.Now()
	own.now = func() time.Time { return now }

	accepted := make(chan *net.TCPConn, 2)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	mine, err := own.Dialer(&net.Dialer{}).Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	theirs, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer theirs.Close()
	for range 2 {
		c := <-accepted
		defer c.Close()
		src := addrPortOf(c.RemoteAddr())
		want := src == addrPortOf(mine.LocalAddr())
		if got := own.IsOwn(src, dst); got != want {
			t.Errorf("IsOwn(%v) = %v, want %v", src, got, want)
		}
	}
	local := addrPortOf(mine.LocalAddr())
	if own.IsOwn(local, netip.MustParseAddrPort("127.0.0.1:1")) {
		t.Error("own source but another destination counted as own")
	}
	now = now.Add(ownSocketTTL)
	if own.IsOwn(local, dst) || own.Len() != 0 {
		t.Errorf("remembered past the TTL (%d left)", own.Len())
	}
}
