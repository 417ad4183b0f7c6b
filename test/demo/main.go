// Command demo shows ferry at work on a local Consul: two pods, frontend and
// backend, each with ferry as its sidecar. The frontend app reaches the
// backend by its Kubernetes DNS name; ferry resolves it to the backend's
// virtual IP, carries the bytes over mutual TLS and the backend's ferry
// checks intentions. Then an intention denies frontend and the same
// connection is refused. Everything is torn down at the end (also on
// Ctrl-C). Run it with `make demo` as root.
package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// demo carries what the steps share.
type demo struct {
	tb                *testbed.Testbed
	ferry, echo       string
	frontend, backend *testbed.Pod
	proxyIDs          map[string]string
}

func run() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, iptables)")
	}
	step("building consul v1.14.11, ferry and the test app")
	consul, err := testbed.Consul()
	if err != nil {
		return err
	}
	d := &demo{proxyIDs: map[string]string{}}
	if d.echo, err = testbed.Echo(); err != nil {
		return err
	}
	if d.ferry, err = testbed.Ferry(); err != nil {
		return err
	}
	step("starting a Consul dev agent and two pods")
	d.tb, err = testbed.Open(consul, func(f string, a ...any) { fmt.Printf("  "+f+"\n", a...) })
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down")
		d.tb.Close()
	}()
	if d.frontend, err = d.tb.NewPod("frontend"); err != nil {
		return err
	}
	if d.backend, err = d.tb.NewPod("backend"); err != nil {
		return err
	}
	fmt.Printf("  pod frontend %s (netns %s)\n  pod backend  %s (netns %s)\n", d.frontend.IP, d.frontend.NS, d.backend.IP, d.backend.NS)

	step("registering frontend and backend with transparent-proxy sidecars")
	for _, s := range []testbed.Service{{Name: "frontend", Pod: d.frontend, Port: 8080}, {Name: "backend", Pod: d.backend, Port: 8080}} {
		r, err := d.tb.RegisterService(s)
		if err != nil {
			return err
		}
		d.proxyIDs[s.Name] = r.ProxyID
		fmt.Printf("  %s: service %s, sidecar %s\n", s.Name, r.ID, r.ProxyID)
	}
	vip, err := waitVIP(d.tb, "backend")
	if err != nil {
		return err
	}
	fmt.Printf("  backend's virtual IP (consul-virtual): %s\n", vip)

	step("backend app: echo server on :8080")
	srv, err := d.backend.StartProcess(testbed.Proc{Name: "backend-app"}, d.echo, "server", "-addr", ":8080")
	if err != nil {
		return err
	}
	defer srv.Stop()
	if err := srv.WaitOutput("ready", 10*time.Second); err != nil {
		return err
	}

	for _, p := range []*testbed.Pod{d.frontend, d.backend} {
		stop, err := d.sidecar(p)
		if err != nil {
			return err
		}
		defer stop()
	}

	step("frontend app -> backend.default.svc.cluster.local:8080 (DNS and TCP both through ferry)")
	out, err := execIn(d.frontend, "getent", "hosts", "backend.default.svc.cluster.local")
	fmt.Printf("  getent hosts: %s", indent(out))
	if err != nil {
		return fmt.Errorf("resolve backend: %w", err)
	}
	out, err = execIn(d.frontend, d.echo, "client", "-addr", "backend.default.svc.cluster.local:8080", "-bytes", "1048576", "-conns", "5")
	fmt.Printf("  %s", indent(out))
	if err != nil {
		return err
	}
	out, _ = execIn(d.backend, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/19000 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
	fmt.Printf("  backend ferry /metrics (inbound connections):\n  %s", indent(lines(out, `ferry_connections_total{direction="inbound"`)))

	step("a plain TCP client in a pod outside the mesh -> backend pod IP:8080: refused by the backend's ferry (no client certificate)")
	outsider, err := d.tb.NewPod("outsider")
	if err != nil {
		return err
	}
	out, err = execIn(outsider, d.echo, "client", "-addr", d.backend.IP.String()+":8080", "-bytes", "1024", "-timeout", "5s")
	fmt.Printf("  %s", indent(out))
	if err == nil {
		return fmt.Errorf("a plain client reached the backend app")
	}
	return d.deny()
}

// sidecar installs the redirect rules in p and starts ferry as UID 5995.
func (d *demo) sidecar(p *testbed.Pod) (stop func(), err error) {
	id := d.proxyIDs[p.Name]
	step(p.Name + ": ferry redirect -proxy-uid 5995 -proxy-id " + id + " -consul-dns-port 8600")
	out, err := execIn(p, d.ferry, "redirect", "-proxy-uid", "5995", "-proxy-id", id, "-consul-dns-port", "8600")
	fmt.Printf("  %s", indent(out))
	if err != nil {
		return nil, err
	}
	step(p.Name + ": ferry run -proxy-id " + id + " (as UID 5995)")
	sc, err := p.StartProcess(testbed.Proc{UID: 5995, Name: "ferry run"}, d.ferry, "run", "-proxy-id", id,
		"-consul-dns-addr", d.tb.Consul.DNSAddr)
	if err != nil {
		return nil, err
	}
	if err := waitReady(p); err != nil {
		sc.Stop()
		return nil, fmt.Errorf("%s: %w\n%s", p.Name, err, sc.Output())
	}
	fmt.Printf("  %s", indent(lines(sc.Output(), "serving")))
	fmt.Printf("  %s", indent(lines(sc.Output(), "leaf certificate loaded")))
	return sc.Stop, nil
}

// deny writes an intention that denies frontend -> backend and shows the
// connection refused, by the backend's sidecar, right after the handshake.
func (d *demo) deny() error {
	step("intention: frontend -> backend = deny")
	_, _, err := d.tb.Consul.Client.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: "backend",
		Sources: []*api.SourceIntention{{Name: "frontend", Action: api.IntentionActionDeny}},
	}, nil)
	if err != nil {
		return err
	}
	// The backend's sidecar watches intentions with a blocking query; give
	// the change a moment to arrive rather than racing it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := execIn(d.frontend, d.echo, "client", "-addr", "backend.default.svc.cluster.local:8080", "-bytes", "1024", "-timeout", "5s")
		if err != nil {
			fmt.Printf("  refused: %s", indent(out))
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("intention deny did not take effect: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	out, _ := execIn(d.backend, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/19000 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
	fmt.Printf("  backend ferry /metrics (denied):\n  %s", indent(lines(out, "ferry_intentions_denied_total{")))
	return nil
}

// waitReady polls the sidecar's /ready (admin on 127.0.0.1:19000 in the pod).
func waitReady(p *testbed.Pod) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := execIn(p, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/19000 && printf 'GET /ready HTTP/1.0\r\n\r\n' >&3 && cat <&3`)
		if strings.Contains(out, " 200 ") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
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
