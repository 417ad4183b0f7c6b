// Command demo shows ferry at work on a local Consul: two pods, frontend and
// backend, registered in the mesh; it prints each step and tears everything
// down at the end (also on Ctrl-C). Run it with `make demo` as root.
package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, iptables)")
	}
	step("building consul v1.14.11 and the test apps")
	consul, err := testbed.Consul()
	if err != nil {
		return err
	}
	echo, err := testbed.Echo()
	if err != nil {
		return err
	}
	step("starting a Consul dev agent and two pods")
	tb, err := testbed.Open(consul, func(f string, a ...any) { fmt.Printf("  "+f+"\n", a...) })
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down")
		tb.Close()
	}()
	frontend, err := tb.NewPod("frontend")
	if err != nil {
		return err
	}
	backend, err := tb.NewPod("backend")
	if err != nil {
		return err
	}
	fmt.Printf("  pod frontend %s (netns %s)\n  pod backend  %s (netns %s)\n", frontend.IP, frontend.NS, backend.IP, backend.NS)

	step("registering frontend and backend with transparent-proxy sidecars")
	var frontendProxy string
	for _, s := range []testbed.Service{{Name: "frontend", Pod: frontend, Port: 8080}, {Name: "backend", Pod: backend, Port: 8080}} {
		r, err := tb.RegisterService(s)
		if err != nil {
			return err
		}
		fmt.Printf("  %s: service %s, sidecar %s\n", s.Name, r.ID, r.ProxyID)
		if s.Pod == frontend {
			frontendProxy = r.ProxyID
		}
	}
	vip, err := waitVIP(tb, "backend")
	if err != nil {
		return err
	}
	fmt.Printf("  backend's virtual IP: %s\n", vip)

	step("starting the backend app (echo server on :8080)")
	srv, err := backend.StartProcess(testbed.Proc{Name: "backend-app"}, echo, "server", "-addr", ":8080")
	if err != nil {
		return err
	}
	defer srv.Stop()
	if err := srv.WaitOutput("ready", 10*time.Second); err != nil {
		return err
	}

	step("frontend -> backend pod IP, no proxy yet")
	out, err := execIn(frontend, echo, "client", "-addr", backend.IP.String()+":8080", "-bytes", "1048576")
	fmt.Printf("  %s", indent(out))
	if err != nil {
		return err
	}
	return dataPath(frontend, backend, frontendProxy, echo)
}

// dataPath puts ferry in front of the frontend pod: its redirect rules send
// every outbound connection to `ferry run` (UID 5995), which passes the
// connection to backend through as plain TCP (mTLS routing arrives with
// the mtls and routing work) and counts it in /metrics.
func dataPath(frontend, backend *testbed.Pod, proxyID, echo string) error {
	ferry, err := testbed.Ferry()
	if err != nil {
		return err
	}
	step("frontend: ferry redirect -proxy-uid 5995 -proxy-id " + proxyID)
	out, err := execIn(frontend, ferry, "redirect", "-proxy-uid", "5995", "-proxy-id", proxyID)
	fmt.Printf("  %s", indent(out))
	if err != nil {
		return err
	}
	step("frontend: ferry run -proxy-id " + proxyID + " (as UID 5995)")
	sidecar, err := frontend.StartProcess(testbed.Proc{UID: 5995, Name: "ferry run"}, ferry, "run", "-proxy-id", proxyID)
	if err != nil {
		return err
	}
	defer sidecar.Stop()
	if err := sidecar.WaitOutput("serving", 15*time.Second); err != nil {
		return err
	}
	fmt.Printf("  %s", indent(lines(sidecar.Output(), "serving")))

	step("frontend -> backend pod IP again, now through ferry's outbound listener")
	out, err = execIn(frontend, echo, "client", "-addr", backend.IP.String()+":8080", "-bytes", "1048576", "-conns", "5")
	fmt.Printf("  %s", indent(out))
	if err != nil {
		return err
	}
	out, err = execIn(frontend, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/19000 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
	if err != nil {
		return err
	}
	fmt.Printf("  ferry /metrics (outbound):\n  %s", indent(lines(out, `direction="outbound"`)))

	step("stopping ferry (SIGTERM: drain, then exit): the same connection is now refused")
	sidecar.Stop()
	out, _ = execIn(frontend, echo, "client", "-addr", backend.IP.String()+":8080", "-bytes", "1024")
	fmt.Printf("  %s", indent(out))
	return nil
}

// lines keeps the lines of s that contain sub, skipping comments, zero
// values and histogram buckets.
func lines(s, sub string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && !strings.HasSuffix(l, " 0") && !strings.HasPrefix(l, "#") && !strings.Contains(l, "_bucket") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n") + "\n"
}

func waitVIP(tb *testbed.Testbed, svc string) (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		vip, err := tb.VirtualIP(svc)
		if err == nil || time.Now().After(deadline) {
			return vip, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func execIn(p *testbed.Pod, argv ...string) (string, error) {
	pr, err := p.StartProcess(testbed.Proc{}, argv...)
	if err != nil {
		return "", err
	}
	err = pr.Wait(2 * time.Minute)
	return pr.Output(), err
}

func step(s string) { fmt.Printf("\n==> %s\n", s) }

func indent(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ") + "\n"
}
