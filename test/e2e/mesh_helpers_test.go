package e2e

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Helpers for tests whose pods are meshed the way test/demo meshes them:
// `ferry redirect` in the pod, then `ferry run` as the proxy UID, ready once
// its admin /ready (127.0.0.1:19000 inside the pod) answers 200.

const (
	meshProxyUID = 5995
	meshAdmin    = "19000" // port of ferry's default -admin-addr 127.0.0.1:19000
)

// meshSidecar installs the redirect rules in pod for proxyID, starts
// `ferry run` (extra flags appended) as the proxy UID and waits for /ready.
func meshSidecar(t *testing.T, pod *testbed.Pod, proxyID string, extra ...string) *testbed.Process {
	t.Helper()
	ferry := testbed.FerryBinary(t)
	pod.ExecOK(t, testbed.Proc{Name: "ferry redirect"}, ferry, "redirect",
		"-proxy-uid", strconv.Itoa(meshProxyUID), "-proxy-id", proxyID)
	return meshRestart(t, t, pod, proxyID, extra...)
}

// meshRestart starts `ferry run` in pod (its rules already installed) and
// waits for /ready. The process lives as long as owner (a subtest may
// start a sidecar for the whole test).
func meshRestart(t *testing.T, owner testing.TB, pod *testbed.Pod, proxyID string, extra ...string) *testbed.Process {
	t.Helper()
	ferry := testbed.FerryBinary(t)
	argv := append([]string{ferry, "run", "-proxy-id", proxyID}, extra...)
	pr := pod.Start(owner, testbed.Proc{UID: meshProxyUID, Name: "ferry run " + pod.Name}, argv...)
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := meshAdminGet(t, pod, "/ready")
		if code == 200 {
			return pr
		}
		select {
		case <-pr.Done():
			t.Fatalf("ferry in %s exited before ready:\n%s", pod.Name, pr.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("ferry in %s not ready after 30s: %d %s\n%s", pod.Name, code, body, pr.Output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// meshAdminGet fetches path from the sidecar's admin listener inside pod
// (bash /dev/tcp, so no thread of the test process enters the namespace).
// It returns the status code (0 when there is no answer) and the body.
func meshAdminGet(t *testing.T, pod *testbed.Pod, path string) (int, string) {
	t.Helper()
	script := fmt.Sprintf(`exec 3<>/dev/tcp/127.0.0.1/%s && printf 'GET %s HTTP/1.0\r\n\r\n' >&3 && cat <&3`, meshAdmin, path)
	out, _ := pod.Exec(t, testbed.Proc{}, "bash", "-c", script)
	head, body, _ := strings.Cut(out, "\r\n\r\n")
	f := strings.Fields(head)
	if len(f) < 2 {
		return 0, out
	}
	code, _ := strconv.Atoi(f[1])
	return code, body
}

// meshMetric returns the value of sample (`name{labels}`) from the
// sidecar's /metrics in pod; 0 when absent.
func meshMetric(t *testing.T, pod *testbed.Pod, sample string) int64 {
	t.Helper()
	code, body := meshAdminGet(t, pod, "/metrics")
	if code != 200 {
		t.Fatalf("%s /metrics: %d %s", pod.Name, code, body)
	}
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, sample+" "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				t.Fatalf("metric %s = %q", sample, v)
			}
			return n
		}
	}
	return 0
}

// meshEchoServer starts test/echo's server on addr in pod (printing one
// "accept" line per connection) and waits until it listens.
func meshEchoServer(t *testing.T, pod *testbed.Pod, name, addr string, extra ...string) *testbed.Process {
	t.Helper()
	argv := append([]string{testbed.EchoBinary(t), "server", "-addr", addr}, extra...)
	pr := pod.Start(t, testbed.Proc{Name: name}, argv...)
	if err := pr.WaitOutput("ready", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return pr
}

// meshLine returns the first line of out that starts with prefix.
func meshLine(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// meshAccepts counts the connections an echo server (not -quiet) accepted:
// its "accept N ADDR" lines, which always follow its "ready" line.
func meshAccepts(pr *testbed.Process) int {
	return strings.Count(pr.Output(), "\naccept ")
}

// meshAcceptsAtLeast waits (up to 10 s) until pr has printed at least n
// accept lines and returns the count: the lines travel through the
// process's output pipe and can arrive after the client has finished.
func meshAcceptsAtLeast(t *testing.T, pr *testbed.Process, n int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if got := meshAccepts(pr); got >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// meshEchoClient runs test/echo's client in pod as root (so the pod's
// rules redirect it like any app connection) and returns its output.
func meshEchoClient(t *testing.T, pod *testbed.Pod, addr string, bytes, conns int, extra ...string) (string, error) {
	t.Helper()
	argv := append([]string{testbed.EchoBinary(t), "client", "-addr", addr,
		"-bytes", strconv.Itoa(bytes), "-conns", strconv.Itoa(conns)}, extra...)
	return pod.Exec(t, testbed.Proc{Name: "echo client"}, argv...)
}

// meshPoll polls cond every 50ms until it holds or limit passes, and
// returns how long it took.
func meshPoll(t *testing.T, what string, limit time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// meshVIP waits for svc's Consul-assigned virtual IP (its sidecar must be
// registered) and returns it.
func meshVIP(t *testing.T, tb *testbed.Testbed, svc string) string {
	t.Helper()
	var vip string
	meshPoll(t, svc+" virtual IP", 10*time.Second, func() bool {
		var err error
		vip, err = tb.VirtualIP(svc)
		return err == nil
	})
	return vip
}

// meshDialIn opens a TCP connection to addr from inside pod's network
// namespace (as root, so the pod's rules apply to it; testbed.Pod.Do).
func meshDialIn(pod *testbed.Pod, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := pod.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}
