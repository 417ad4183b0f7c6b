package redirect

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// InNetNS runs fn on a locked OS thread that has joined the network
// namespace at path (empty path: the current namespace, still on a locked
// thread). Sockets fn opens and processes it execs belong to that
// namespace: a child inherits the namespace of the thread that forks it,
// and exec.Cmd forks on the calling goroutine's thread, which stays locked
// here. When fn returns the thread goes back to its own namespace before it
// is unlocked; if that fails it stays locked and the runtime throws it away
// rather than reuse it in the wrong namespace. (Discarding it is not the
// default: when the thread is the main thread the runtime keeps it, wedged,
// and /proc/<pid>/ns/net, which names the main thread's namespace, would
// point into the other namespace for the rest of the process; tooling that
// kills "every process in the namespace" then kills this one.)
func InNetNS(path string, fn func() error) error {
	var f *os.File
	if path != "" {
		var err error
		f, err = os.Open(path)
		if err != nil {
			return fmt.Errorf("redirect: open netns: %w", err)
		}
		defer f.Close()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		var orig *os.File
		if f != nil {
			var err error
			if orig, err = os.Open("/proc/thread-self/ns/net"); err != nil {
				runtime.UnlockOSThread()
				errc <- fmt.Errorf("redirect: open own netns: %w", err)
				return
			}
			defer orig.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				runtime.UnlockOSThread()
				errc <- fmt.Errorf("redirect: enter netns %s: %w", path, err)
				return
			}
		}
		err := fn()
		if orig == nil || unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// IPv6Enabled reports whether the current thread's network namespace
// carries IPv6 on any interface other than loopback: an interface that has
// an IPv6 address of any scope (a link-local fe80:: address is enough for
// same-L2 neighbours to connect), or on which IPv6 is not disabled
// (disable_ipv6 = 0: it gets a link-local address as soon as it is up).
// why names the interface and the reason. Call it inside InNetNS: both the
// interface list and /proc/sys/net belong to the calling thread's
// namespace.
//
// Installing the IPv6 rules only for global addresses (as ferry did) let a
// neighbour pod reach a dual-stack app over link-local IPv6 directly, past
// mTLS and intentions (audit F8).
func IPv6Enabled() (enabled bool, why string, err error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return false, "", fmt.Errorf("redirect: list interfaces: %w", err)
	}
	if _, err := os.Stat("/proc/sys/net/ipv6"); errors.Is(err, fs.ErrNotExist) {
		return false, "", nil // kernel without IPv6 (ipv6.disable=1)
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return false, "", fmt.Errorf("redirect: addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() == nil && !ipn.IP.IsLoopback() {
				return true, fmt.Sprintf("%s has IPv6 address %s", ifc.Name, ipn.IP), nil
			}
		}
		b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv6/conf", ifc.Name, "disable_ipv6"))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return false, "", fmt.Errorf("redirect: IPv6 setting of %s: %w", ifc.Name, err)
		}
		if strings.TrimSpace(string(b)) == "0" {
			return true, fmt.Sprintf("IPv6 is enabled on %s (disable_ipv6 = 0)", ifc.Name), nil
		}
	}
	return false, "", nil
}
