package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Issue 15, lifecycle as consul-dataplane's: with a shutdown grace period,
// SIGTERM closes the inbound listener at once while the process stays up
// for the grace period, then exits 0; POST /quitquitquit exits 0 at once.
func TestLifecycle(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	pod := tb.AddPod(t, "app")
	r := tb.Register(t, testbed.Service{Name: "app", Pod: pod, Port: mtAppPort})
	meshEchoServer(t, pod, "app", ":"+strconv.Itoa(mtAppPort))
	ferry := meshSidecar(t, pod, r.ProxyID, "-shutdown-grace-period", "4s", "-graceful-addr", "127.0.0.1:20600")
	inbound := net.JoinHostPort(pod.IP.String(), "20000")
	if c, err := net.DialTimeout("tcp", inbound, 3*time.Second); err != nil {
		t.Fatalf("inbound before shutdown: %v", err)
	} else {
		c.Close()
	}
	start := time.Now()
	if err := ferry.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	meshPoll(t, "inbound refused after SIGTERM", 3*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", inbound, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case <-ferry.Done():
		t.Fatalf("exited before the grace period (%v):\n%s", time.Since(start), ferry.Output())
	default:
	}
	if err := ferry.Wait(20 * time.Second); err != nil {
		t.Fatalf("exit after the grace period: %v\n%s", err, ferry.Output())
	}
	if d := time.Since(start); d < 4*time.Second {
		t.Fatalf("exited after %v, before the 4 s grace period", d)
	}

	// quitquitquit: a fresh sidecar exits 0 at once.
	ferry = meshRestart(t, t, pod, r.ProxyID, "-shutdown-grace-period", "60s")
	c, err := meshDialIn(pod, "127.0.0.1:"+meshAdmin, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /quitquitquit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("POST /quitquitquit: %v %v", resp, err)
	}
	if err := ferry.Wait(5 * time.Second); err != nil {
		t.Fatalf("after quitquitquit: %v\n%s", err, ferry.Output())
	}
}
