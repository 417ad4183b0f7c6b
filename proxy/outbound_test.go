package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"golang.org/x/sys/unix"
)

// The outbound path needs a real REDIRECT, so these tests build a private
// network namespace: lo carries 198.18.251.1 (the "remote" server) and an
// OUTPUT rule sends connections to it into the proxy's outbound listener,
// except those carrying the proxy's socket mark, the stand-in for the
// proxy UID exclusion (everything here runs as root).

const proxyMark = 0x5995

type netnsEnv struct {
	path, name string
}

func newNetnsEnv(t *testing.T) *netnsEnv {
	t.Helper()
	testkit.RequireRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	n := &netnsEnv{name: "ferry-pt-" + hex.EncodeToString(b)}
	n.path = "/var/run/netns/" + n.name
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	n.run(t, "ip", "link", "set", "lo", "up")
	n.run(t, "ip", "addr", "add", "198.18.251.1/32", "dev", "lo")
	return n
}

func (n *netnsEnv) run(t *testing.T, argv ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"netns", "exec", n.name}, argv...)...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
	}
}

// do runs f with the calling thread inside the namespace.
func (n *netnsEnv) do(f func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open(n.path)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return errors.Join(ferr, err) // thread stays locked and dies with the goroutine
	}
	runtime.UnlockOSThread()
	return ferr
}

// dialer dials from inside the namespace with the proxy mark set.
type nsDialer struct{ n *netnsEnv }

func (d nsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := d.n.do(func() error {
		var err error
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, proxyMark) })
			return serr
		}}
		c, err = nd.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// setupOutbound starts a proxy in the namespace with the redirect rule and
// an echo server on 198.18.251.1:7000; it returns the proxy and a dial func
// for "app" connections (unmarked, hence redirected).
func setupOutbound(t *testing.T, cfg Config) (*Proxy, func(addr string) (net.Conn, error)) {
	t.Helper()
	n := newNetnsEnv(t)
	p, dial, _ := n.redirectedProxy(t, cfg, "198.18.251.1:7000", "iptables", "198.18.251.0/24", "")
	return p, dial
}

// redirectedProxy starts an echo server on echoAddr and a proxy in the
// namespace (whose inbound app is app, else the echo server), with an
// OUTPUT REDIRECT (by iptablesCmd, for cidr) of unmarked connections to the
// proxy's outbound listener. It returns the proxy, a dial func for app
// connections (unmarked, hence redirected) and the echo server's address.
func (n *netnsEnv) redirectedProxy(t *testing.T, cfg Config, echoAddr, iptablesCmd, cidr, app string) (*Proxy, func(addr string) (net.Conn, error), string) {
	t.Helper()
	var dst string
	if err := n.do(func() error {
		ln, err := net.Listen("tcp", echoAddr)
		if err != nil {
			return err
		}
		dst = ln.Addr().String()
		testkit.ServeEcho(t, ln, "")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if app == "" {
		app = dst
	}
	cfg.Dialer = nsDialer{n}
	var p *Proxy
	if err := n.do(func() error {
		p = startProxy(t, cfg, app)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	_, out := p.Addrs()
	_, port, _ := net.SplitHostPort(out.String())
	n.run(t, iptablesCmd, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", cidr,
		"-m", "mark", "!", "--mark", "0x5995", "-j", "REDIRECT", "--to-ports", port)
	return p, func(addr string) (net.Conn, error) {
		var c net.Conn
		err := n.do(func() error {
			var err error
			c, err = net.Dial("tcp", addr)
			return err
		})
		return c, err
	}, dst
}

func dialExchange(t *testing.T, dial func(string) (net.Conn, error), addr, msg string) (string, error) {
	t.Helper()
	c, err := dial(addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return exchangeOn(c, msg)
}

func TestOutboundPassthrough(t *testing.T) {
	testkit.CheckLeaks(t)
	p, dial := setupOutbound(t, Config{})
	got, err := dialExchange(t, dial, "198.18.251.1:7000", "through ferry")
	if err != nil || got != "through ferry" {
		t.Fatalf("passthrough: %q, %v", got, err)
	}
	testkit.Eventually(t, "outbound ok", func() bool { return counter(p, "outbound", "ok") == 1 })
	if s := p.Metrics().SentBytes.With("outbound").Value(); s != int64(len("through ferry")) {
		t.Fatalf("sent bytes %d", s)
	}
	// A closed port on the original destination: the app sees a reset.
	if _, err := dialExchange(t, dial, "198.18.251.1:7001", "x"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("closed destination port: %v, want reset", err)
	}
	testkit.Eventually(t, "dial error", func() bool { return counter(p, "outbound", "dial_error") == 1 })
}

// The Router hook sees the original destination and picks the action.
func TestOutboundRouterHook(t *testing.T) {
	testkit.CheckLeaks(t)
	seen := make(chan netip.AddrPort, 10)
	var app2 string
	router := RouterFunc(func(ctx context.Context, dst netip.AddrPort) Route {
		seen <- dst
		switch dst.Port() {
		case 7002: // "mesh upstream": a custom dial (here: plain to the echo server on :7000)
			return Route{Action: Dial, Upstream: "echo", Keys: []string{"upstream:echo"},
				Dial: func(ctx context.Context) (net.Conn, error) { return net.Dial("tcp", app2) }}
		case 7003:
			return Route{Action: Reject, Reason: "MeshDestinationsOnly"}
		}
		return Route{Action: Passthrough}
	})
	app2 = testkit.EchoServer(t) // the custom dial's target, in the root namespace on loopback
	p, dial := setupOutbound(t, Config{Router: router})

	if got, err := dialExchange(t, dial, "198.18.251.1:7002", "via dial"); err != nil || got != "via dial" {
		t.Fatalf("Dial route: %q, %v", got, err)
	}
	if dst := <-seen; dst != netip.MustParseAddrPort("198.18.251.1:7002") {
		t.Fatalf("router saw %v", dst)
	}
	if _, err := dialExchange(t, dial, "198.18.251.1:7003", "x"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("Reject route: %v, want reset", err)
	}
	<-seen
	testkit.Eventually(t, "rejected and ok counted", func() bool {
		return counter(p, "outbound", "rejected") == 1 && counter(p, "outbound", "ok") == 1
	})
}

func exchangeOn(c net.Conn, msg string) (string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// A reset that beats the write is reported by the write, not the read.
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite() // after a reset: ENOTCONN; the read reports the reset
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			if err.Error() == "EOF" {
				return b.String(), nil
			}
			return b.String(), err
		}
	}
}
