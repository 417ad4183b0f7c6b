package redirect

import (
	"fmt"
	"net"
	"os"
	"runtime"

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

// HasGlobalIPv6 reports whether any interface of the current thread's
// network namespace has a global-scope IPv6 address (ULA included; not
// loopback, link-local or multicast). Call it inside InNetNS.
func HasGlobalIPv6() (bool, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false, fmt.Errorf("redirect: list addresses: %w", err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.To4() != nil {
			continue
		}
		if ipn.IP.IsGlobalUnicast() {
			return true, nil
		}
	}
	return false, nil
}
