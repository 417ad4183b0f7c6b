package e2e

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestTestbed proves the testbed itself: two pods reach each other over the
// bridge, both reach the agent's HTTP API, nothing can leave the test
// network, and nothing is left behind afterwards.
func TestTestbed(t *testing.T) {
	testbed.RequireRoot(t)
	echo := testbed.EchoBinary(t)
	var name string
	t.Run("pods", func(t *testing.T) {
		tb := testbed.New(t)
		name = tb.Name
		a := tb.AddPod(t, "a")
		b := tb.AddPod(t, "b")

		srv := b.Start(t, testbed.Proc{UID: 5995}, echo, "server", "-addr", ":7000")
		if err := srv.WaitOutput("ready", 10*time.Second); err != nil {
			t.Fatal(err)
		}
		out := a.ExecOK(t, testbed.Proc{}, echo, "client", "-addr", b.IP.String()+":7000", "-bytes", "1000000", "-conns", "3")
		if !strings.HasPrefix(out, "ok conns=3") {
			t.Fatalf("client: %s", out)
		}
		if err := srv.WaitOutput("accept 3 "+a.IP.String(), 5*time.Second); err != nil {
			t.Fatal(err)
		}
		// The server runs as the proxy UID, as ferry will.
		if out := b.ExecOK(t, testbed.Proc{}, "ps", "-o", "uid=", "-p", strconv.Itoa(srv.PID())); strings.TrimSpace(out) != "5995" {
			t.Fatalf("server uid = %q, want 5995", out)
		}

		for _, p := range []*testbed.Pod{a, b} {
			out := p.ExecOK(t, testbed.Proc{}, "bash", "-c", "exec 3<>/dev/tcp/"+hostPort(tb.Consul.HTTPAddr)+` && printf 'GET /v1/status/leader HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
			if !strings.Contains(out, "200 OK") {
				t.Fatalf("pod %s -> agent: %s", p.Name, out)
			}
			if rc := p.ExecOK(t, testbed.Proc{}, "cat", "/etc/resolv.conf"); !strings.Contains(rc, "nameserver 127.0.0.1") {
				t.Fatalf("pod %s resolv.conf: %q", p.Name, rc)
			}
		}
		// An address off the bridge (still in the benchmarking range) goes
		// into the pod's sink: the connect times out, nothing is reached.
		other := outside(tb)
		if out := a.ExecOK(t, testbed.Proc{}, "ip", "route", "get", other); !strings.Contains(out, "dev sink0") {
			t.Fatalf("default route not into the sink: %s", out)
		}
		if _, err := a.Exec(t, testbed.Proc{}, "timeout", "2", "bash", "-c", "exec 3<>/dev/tcp/"+other+"/80"); err == nil {
			t.Fatal("connect off the test network succeeded")
		}
	})

	// Other test processes may create and delete testbeds meanwhile, so
	// look only for objects carrying this testbed's name.
	if name == "" {
		t.Fatal("testbed was not created")
	}
	for _, argv := range [][]string{{"ip", "netns", "list"}, {"ip", "-o", "link", "show"}, {"ls", "/etc/netns"}, {"ps", "-eo", "args"}} {
		out, _ := testbed.MustCommand(t, argv[0], argv[1:]...).Output()
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, name) {
				t.Errorf("left behind (%s): %s", strings.Join(argv, " "), l)
			}
		}
	}
}

// outside returns an address in 198.18.0.0/15 that is not in tb's subnet.
func outside(tb *testbed.Testbed) string {
	a := tb.Subnet.Addr().As4()
	a[2] ^= 0x80
	a[3] = 9
	return netip.AddrFrom4(a).String()
}

func hostPort(addr string) string { return strings.Replace(addr, ":", "/", 1) }

// TestConsulVersion pins the test agent: the tools module must build Consul
// v1.14.11, the last MPL-2.0 line this project may use.
func TestConsulVersion(t *testing.T) {
	testbed.RequireRoot(t)
	out, err := testbed.MustCommand(t, testbed.ConsulBinary(t), "version").CombinedOutput()
	if err != nil {
		t.Fatalf("consul version: %v\n%s", err, out)
	}
	if !strings.HasPrefix(string(out), "Consul v1.14.11\n") {
		t.Fatalf("consul version = %q, want Consul v1.14.11", out)
	}
}
