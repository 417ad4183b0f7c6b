package testbed

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs f on an OS thread inside the pod's network namespace, as root:
// sockets f opens stay in the pod's namespace (and its rules apply to
// them, as to any app's), while the thread goes back to the host's.
//
// The thread is switched back rather than discarded. Discarding it would
// kill pod processes the runtime happened to fork from it (they run with
// Pdeathsig, which fires when the forking *thread* exits), and if it were
// the main thread the runtime would keep it, wedged in the pod, for good:
// /proc/<pid>/ns/net would then name the pod, whose teardown kills every
// process in it, the test binary too. Only when switching back fails is
// the thread discarded: nothing else may run in the pod's namespace.
func (p *Pod) Do(f func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(p.NSPath)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("setns %s: %w", p.NS, err)
			return
		}
		ferr := f()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- ferr
	}()
	return <-ch
}
