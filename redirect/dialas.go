package redirect

import (
	"context"
	"fmt"
	"net"
	"runtime"

	"golang.org/x/sys/unix"
)

// DialAsUID returns a DialContext whose sockets are owned by uid as far as
// iptables' owner match is concerned, so that connections it makes are not
// captured by the pod's outbound redirection when uid is the exempt proxy
// UID.
//
// Why: `ferry redirect -proxy-id` reads the proxy registration from the
// Consul agent before it installs the rules. When an init container runs a
// second time in the same network namespace (pod restart), the rules of the
// first run are already there and would send that lookup to the proxy's
// outbound port, where nothing listens yet ("connection refused"). Consul's
// own `redirect-traffic` has the same problem (and fails anyway on its
// second run with "Chain already exists").
//
// How: `-m owner --uid-owner` matches the fsuid of the credentials the
// socket's file was opened with, fixed when the socket is created. The
// socket is created on a goroutine locked to its OS thread, whose fsuid
// alone is switched to uid for the dial with a raw setfsuid(2) (per thread;
// Go's syscall.Setresuid and friends would change every thread of the
// process). fsuid only governs file-system permission checks and this
// owner match; nothing else runs on the locked thread meanwhile. The dial
// is serial (no Happy Eyeballs racers on other threads). If the fsuid
// cannot be set back, the thread is left locked so that the runtime
// discards it with the goroutine.
//
// Without the privilege to switch (not root) the dial goes ahead
// unchanged. A host name in the address is resolved inside the dial with
// the same credentials; DNS to a redirected resolver is still redirected,
// so give the agent as an IP address (consul-k8s uses the host IP).
func DialAsUID(uid uint32, d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	serial := *d
	serial.FallbackDelay = -1 // one goroutine, one thread: no parallel racers
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread()
			prev, err := unix.SetfsuidRetUid(int(uid))
			switched := err == nil && currentFsuid() == int(uid)
			if !switched {
				// Not permitted: the fsuid is unchanged; dial as we are.
				runtime.UnlockOSThread()
			}
			c, err := serial.DialContext(ctx, network, addr)
			if switched {
				if _, rerr := unix.SetfsuidRetUid(prev); rerr == nil && currentFsuid() == prev {
					runtime.UnlockOSThread()
				} // else: still locked, so the runtime discards the thread
			}
			ch <- result{c, err}
		}()
		// DialContext honours ctx, so the goroutine ends promptly.
		r := <-ch
		if r.err != nil {
			return nil, fmt.Errorf("dial %s as UID %d: %w", addr, uid, r.err)
		}
		return r.c, nil
	}
}

// currentFsuid reads the calling thread's fsuid: setfsuid(-1) changes
// nothing and returns the current value.
func currentFsuid() int {
	cur, _ := unix.SetfsuidRetUid(-1)
	return cur
}
