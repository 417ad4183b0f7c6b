package redirect

import (
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// InNetNS runs fn on a fresh OS thread that has joined the network
// namespace at path (empty path: the current namespace, still on a locked
// thread). Sockets fn opens and processes it execs belong to that
// namespace: a child inherits the namespace of the thread that forks it,
// and exec.Cmd forks on the calling goroutine's thread, which stays locked
// here. The thread is never unlocked, so the Go runtime throws it away
// when fn returns instead of reusing it in the wrong namespace.
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
		runtime.LockOSThread() // deliberately never unlocked, see above
		if f != nil {
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				errc <- fmt.Errorf("redirect: enter netns %s: %w", path, err)
				return
			}
		}
		errc <- fn()
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
