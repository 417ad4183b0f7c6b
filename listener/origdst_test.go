package listener

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// testNetns creates a private network namespace with lo up and the given
// extra commands run inside it, removed at cleanup. Root only.
func testNetns(t *testing.T, cmds ...[]string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace with iptables rules")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "ferry-lt-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	for _, c := range append([][]string{{"ip", "link", "set", "lo", "up"}}, cmds...) {
		argv := append([]string{"netns", "exec", name}, c...)
		if out, err := exec.Command("ip", argv...).CombinedOutput(); err != nil {
			t.Fatalf("in %s: %s: %v: %s", name, strings.Join(c, " "), err, out)
		}
	}
	return "/var/run/netns/" + name
}

// inNetns runs f on an OS thread switched into the namespace at path, so the
// sockets f creates live there; it switches back afterwards.
func inNetns(t *testing.T, path string, f func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := os.Open(path)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it exits with this goroutine
			// instead of serving others from the wrong namespace.
			t.Errorf("restore netns: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	f()
}

// A connection to a foreign address redirected by iptables REDIRECT yields
// that foreign address, for IPv4 and IPv6.
func TestOriginalDstRedirected(t *testing.T) {
	for _, tc := range []struct {
		name, iptables, listen, virtual, mask string
	}{
		{"ipv4", "iptables", "127.0.0.1:0", "198.18.250.1", "32"},
		// What "0.0.0.0:port" gives with network "tcp": an AF_INET6
		// dual-stack socket accepting IPv4 as v4-mapped addresses.
		{"ipv4 on a dual-stack socket", "iptables", "0.0.0.0:0", "198.18.250.1", "32"},
		{"ipv6", "ip6tables", "[::1]:0", "2001:db8::f1", "128"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ln *net.TCPListener
			var port string
			ns := testNetns(t)
			inNetns(t, ns, func() {
				l, err := net.Listen("tcp", tc.listen)
				if err != nil {
					t.Fatal(err)
				}
				ln = l.(*net.TCPListener)
				_, port, _ = net.SplitHostPort(ln.Addr().String())
			})
			t.Cleanup(func() { ln.Close() })
			nsName := strings.TrimPrefix(ns, "/var/run/netns/")
			for _, c := range [][]string{
				{"ip", "addr", "add", tc.virtual + "/" + tc.mask, "dev", "lo"},
				{tc.iptables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", tc.virtual, "--dport", "4242", "-j", "REDIRECT", "--to-ports", port},
			} {
				if out, err := exec.Command("ip", append([]string{"netns", "exec", nsName}, c...)...).CombinedOutput(); err != nil {
					t.Fatalf("%s: %v: %s", strings.Join(c, " "), err, out)
				}
			}

			var client net.Conn
			inNetns(t, ns, func() {
				var err error
				client, err = net.Dial("tcp", net.JoinHostPort(tc.virtual, "4242"))
				if err != nil {
					t.Fatal(err)
				}
			})
			defer client.Close()
			sc, err := ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			got, err := OriginalDst(sc)
			if err != nil {
				t.Fatalf("OriginalDst: %v", err)
			}
			want := netip.AddrPortFrom(netip.MustParseAddr(tc.virtual), 4242)
			if got != want {
				t.Fatalf("OriginalDst = %v, want %v (listener %v)", got, want, sc.LocalAddr())
			}
			// The port the listener really has is different: proof that
			// the answer came from conntrack, not from LocalAddr.
			if strconv.Itoa(int(got.Port())) == port {
				t.Fatal("redirect target port equals the virtual port")
			}
		})
	}
}

func TestParseSockaddrIn(t *testing.T) {
	b := []byte{unix.AF_INET, 0, 0x1f, 0x90, 198, 18, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0}
	got, err := parseSockaddrIn(b)
	if err != nil || got != netip.MustParseAddrPort("198.18.0.7:8080") {
		t.Fatalf("parseSockaddrIn = %v, %v", got, err)
	}
	if _, err := parseSockaddrIn(b[:4]); err == nil {
		t.Fatal("no error for a short buffer")
	}
	bad := append([]byte(nil), b...)
	bad[0] = unix.AF_INET6
	if _, err := parseSockaddrIn(bad); err == nil || errors.Is(err, ErrNoOriginalDst) {
		t.Fatalf("wrong family: %v", err)
	}
}
