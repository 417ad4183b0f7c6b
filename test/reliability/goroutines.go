package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"golang.org/x/sys/unix"
)

// goroutines reads ferry_goroutines from a sidecar's /metrics, or -1 when
// the sidecar does not answer within a second (dead, or too busy: the
// reading is then missing, not zero). It dials from this process into the
// pod's namespace rather than exec'ing a client there: it runs every
// sample, for both sidecars.
func goroutines(pod *testbed.Pod) int {
	c, err := dialIn(pod, adminAddr, time.Second)
	if err != nil {
		return -1
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
		return -1
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "ferry_goroutines "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return -1
			}
			return n
		}
	}
	return -1
}

// dialIn dials addr (TCP) from inside pod's network namespace. The thread
// goes back to this process's namespace afterwards instead of being
// discarded: pod processes run with Pdeathsig, which fires when the thread
// that forked them exits.
func dialIn(pod *testbed.Pod, addr string, timeout time.Duration) (net.Conn, error) {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := os.Open(pod.NSPath)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	c, err := net.DialTimeout("tcp", addr, timeout)
	if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
		// A thread left in the pod's namespace must not run anything else.
		panic(fmt.Sprintf("restore netns: %v", serr))
	}
	runtime.UnlockOSThread()
	return c, err
}
