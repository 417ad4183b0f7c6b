package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// Path ids, in report order.
const (
	pDirect    = "direct"
	pFerryPT   = "ferry-pt"
	pFerryMTLS = "ferry-mtls"
	pConsul    = "consul"
	pHAProxy   = "haproxy"
	// The same two ferry paths with a second ferry binary (-ferry-b), for
	// before/after comparisons of a change in one interleaved run.
	pFerryPTB   = "ferry-pt-b"
	pFerryMTLSB = "ferry-mtls-b"
	// The mTLS pair with kernel TLS: one session per connection
	// (-tunnels=false), which both sidecars hand to the kernel when it
	// can (-ktls=auto). On by default only where the kernel can.
	pFerryKTLS = "ferry-ktls"
)

var allPathIDs = []string{pDirect, pFerryPT, pFerryMTLS, pConsul, pHAProxy}

var pathNames = map[string]string{
	pDirect:     "direct (no proxy)",
	pFerryPT:    "ferry passthrough (1 hop)",
	pFerryMTLS:  "ferry mTLS pair",
	pConsul:     "Consul built-in pair",
	pHAProxy:    "HAProxy TLS pair",
	pFerryPTB:   "ferry passthrough (B)",
	pFerryMTLSB: "ferry mTLS pair (B)",
	pFerryKTLS:  "ferry mTLS pair, kernel TLS (-tunnels=false)",
}

func knownPath(id string) bool { _, ok := pathNames[id]; return ok }

const proxyUID = 5995

// path is one way from the load generator to a server.
type path struct {
	ID      string
	Client  *testbed.Pod       `json:"-"` // where the load generator runs
	Addr    string             // what it dials
	Proxies []*testbed.Process `json:"-"`
	// NA is why the path could not be set up; empty when it works.
	NA string
	// TLS is where the path's TLS records are sealed and opened (tlsmode.go).
	TLS string `json:",omitempty"`
	// ferryPods are the pods of its ferry sidecars (admin on 127.0.0.1:19000).
	ferryPods []*testbed.Pod
}

// env is the testbed plus everything the paths share.
type env struct {
	tb     *testbed.Testbed
	self   string // this binary: load generator and server in the pods
	consul string
	ferry  string
	ferryB string // -ferry-b: the binary of the "(B)" paths
	work   string // PEMs, configs, hold files
	// pin puts every proxy on CPU 1 (one thread: GOMAXPROCS=1, nbthread 1)
	// and the load generator and servers on CPU 0: "a sidecar gets a core".
	pin   bool
	logf  func(string, ...any)
	procs []*testbed.Process
}

func (e *env) start(pod *testbed.Pod, o testbed.Proc, argv ...string) (*testbed.Process, error) {
	pr, err := pod.StartProcess(o, argv...)
	if err != nil {
		return nil, err
	}
	e.procs = append(e.procs, pr)
	return pr, nil
}

// startProxy starts a proxy process, pinned when e.pin.
func (e *env) startProxy(pod *testbed.Pod, o testbed.Proc, argv ...string) (*testbed.Process, error) {
	if e.pin {
		o.Env = append(o.Env, "GOMAXPROCS=1")
		argv = append([]string{"taskset", "-c", "1"}, argv...)
	}
	return e.start(pod, o, argv...)
}

// app prefixes the argv of a load generator or server for pinning.
func (e *env) app(argv ...string) []string {
	if e.pin {
		return append([]string{"taskset", "-c", "0"}, argv...)
	}
	return argv
}

func (e *env) stopAll() {
	for i := len(e.procs) - 1; i >= 0; i-- {
		e.procs[i].Stop()
	}
	e.procs = nil
}

// exec runs argv in pod to completion, bounded by d.
func (e *env) exec(pod *testbed.Pod, o testbed.Proc, d time.Duration, argv ...string) (string, error) {
	pr, err := pod.StartProcess(o, argv...)
	if err != nil {
		return "", err
	}
	if err := pr.Wait(d); err != nil {
		pr.Stop()
		return pr.Output(), fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
	}
	return pr.Output(), nil
}

// tunePod lets the connection-rate scenario reuse TIME_WAIT ports.
func (e *env) tunePod(pod *testbed.Pod) error {
	for _, kv := range []string{"net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=15500 60999"} {
		if _, err := testbed.LookPath("sysctl"); err != nil {
			return err
		}
		cmd, err := testbed.Command("ip", "netns", "exec", pod.NS, "sysctl", "-q", "-w", kv)
		if err != nil {
			return err
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("sysctl %s in %s: %w: %s", kv, pod.Name, err, out)
		}
	}
	return nil
}

func (e *env) probe(pod *testbed.Pod, addr string) error {
	out, err := e.exec(pod, testbed.Proc{}, 25*time.Second, e.self, "probe", "-addr", addr, "-timeout", "15s")
	if err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
	}
	return nil
}

func (e *env) server(pod *testbed.Pod, addr string) error {
	pr, err := e.start(pod, testbed.Proc{Name: "server " + addr}, e.app(e.self, "server", "-addr", addr)...)
	if err != nil {
		return err
	}
	return pr.WaitOutput("ready", 10*time.Second)
}

// ferryMissing says why `ferry run` / `ferry redirect` cannot be used yet.
func (e *env) ferryMissing(bin string) string {
	if bin == "" {
		return "ferry binary did not build (or no -ferry-b)"
	}
	for _, sub := range []string{"run", "redirect"} {
		cmd, err := testbed.Command(bin, sub, "-h")
		if err != nil {
			return err.Error()
		}
		out, _ := cmd.CombinedOutput()
		if strings.Contains(string(out), "not implemented") {
			return "`ferry " + sub + "` is not implemented yet"
		}
	}
	return ""
}

// setupPaths builds the pods and proxies. A path whose setup fails is kept
// with NA set, so the report says why instead of the run failing.
func (e *env) setupPaths(ids []string) ([]*path, error) {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	tb := e.tb
	cli, err := tb.NewPod("cli")
	if err != nil {
		return nil, err
	}
	srv, err := tb.NewPod("srv")
	if err != nil {
		return nil, err
	}
	for _, p := range []*testbed.Pod{cli, srv} {
		if err := e.tunePod(p); err != nil {
			return nil, err
		}
	}
	// :9090 is a plain server nobody registered (direct and passthrough);
	// :8080 is the app behind the Consul and HAProxy server-side proxies.
	for _, a := range []string{":9090", ":8080"} {
		if err := e.server(srv, a); err != nil {
			return nil, err
		}
	}
	plain := net.JoinHostPort(srv.IP.String(), "9090")
	var paths []*path
	for _, id := range ids {
		p := &path{ID: id}
		var err error
		switch id {
		case pDirect:
			p.Client, p.Addr = cli, plain
		case pConsul:
			err = e.setupConsul(p, cli, srv)
		case pHAProxy:
			err = e.setupHAProxy(p, cli, srv)
		case pFerryPT:
			err = e.setupFerryPT(p, plain, e.ferry, "")
		case pFerryMTLS:
			err = e.setupFerryMTLS(p, e.ferry, "")
		case pFerryPTB:
			err = e.setupFerryPT(p, plain, e.ferryB, "b")
		case pFerryMTLSB:
			err = e.setupFerryMTLS(p, e.ferryB, "b")
		case pFerryKTLS:
			err = e.setupFerryMTLS(p, e.ferry, "k", "-tunnels=false", "-ktls=auto")
		}
		if err == nil && p.NA == "" {
			if err = e.probe(p.Client, p.Addr); err != nil {
				for _, pr := range p.Proxies {
					err = fmt.Errorf("%w; %s says: %s", err, pr.Name, lastLines(pr.Output(), 3))
				}
			}
		}
		if err != nil {
			p.NA = "setup failed: " + strings.ReplaceAll(oneLine(err.Error()), e.self, "bench")
			if (id == pFerryMTLS || id == pFerryMTLSB || id == pFerryKTLS) && strings.Contains(err.Error(), `upstream=""`) {
				p.NA = "`ferry run` does not route the service's virtual IP to its mesh upstream yet " +
					"(it treated it as a non-mesh destination), so the mTLS pair cannot run. " + p.NA
			}
		}
		if p.NA != "" {
			e.logf("path %-10s NOT AVAILABLE: %s", id, p.NA)
		} else {
			e.logf("path %-10s ready: %s dials %s (%d proxy processes)", id, p.Client.Name, p.Addr, len(p.Proxies))
		}
		paths = append(paths, p)
	}
	return paths, nil
}

func (e *env) setupConsul(p *path, cli, srv *testbed.Pod) error {
	r, err := e.tb.RegisterService(testbed.Service{Name: "bench-consul", Pod: srv, Port: 8080, SidecarPort: 20000, Direct: true})
	if err != nil {
		return err
	}
	sp, err := e.startProxy(srv, testbed.Proc{Name: "consul proxy (server)"}, e.consul, "connect", "proxy", "-sidecar-for", r.ID, "-log-level", "warn")
	if err != nil {
		return err
	}
	cp, err := e.startProxy(cli, testbed.Proc{Name: "consul proxy (client)"}, e.consul, "connect", "proxy",
		"-service", "bench-consul-client", "-upstream", "bench-consul:21000", "-log-level", "warn")
	if err != nil {
		return err
	}
	p.Client, p.Addr, p.Proxies = cli, "127.0.0.1:21000", []*testbed.Process{cp, sp}
	return nil
}

func (e *env) setupHAProxy(p *path, cli, srv *testbed.Pod) error {
	bin, err := testbed.LookPath("haproxy")
	if err != nil {
		p.NA = err.Error()
		return nil
	}
	agent := e.tb.Consul.Client.Agent()
	roots, _, err := agent.ConnectCARoots(nil)
	if err != nil {
		return fmt.Errorf("ca roots: %w", err)
	}
	var rootPEM strings.Builder
	for _, r := range roots.Roots {
		rootPEM.WriteString(r.RootCertPEM)
		rootPEM.WriteString("\n")
	}
	files := map[string]string{"roots.pem": rootPEM.String()}
	for _, svc := range []string{"bench-haproxy-server", "bench-haproxy-client"} {
		leaf, _, err := agent.ConnectCALeaf(svc, &api.QueryOptions{})
		if err != nil {
			return fmt.Errorf("leaf %s: %w", svc, err)
		}
		files[svc+".pem"] = leaf.CertPEM + "\n" + leaf.PrivateKeyPEM + "\n"
	}
	files["server.cfg"] = e.haproxyConfig(fmt.Sprintf(`frontend mesh_in
  bind :20001 ssl crt %s ca-file %s verify required
  default_backend app
backend app
  server app 127.0.0.1:8080
`, e.file("bench-haproxy-server.pem"), e.file("roots.pem")))
	files["client.cfg"] = e.haproxyConfig(fmt.Sprintf(`frontend app_out
  bind 127.0.0.1:21001
  default_backend mesh
backend mesh
  server srv %s:20001 ssl crt %s ca-file %s verify required
`, srv.IP, e.file("bench-haproxy-client.pem"), e.file("roots.pem")))
	for name, body := range files {
		if err := os.WriteFile(e.file(name), []byte(body), 0o600); err != nil {
			return err
		}
	}
	sp, err := e.startProxy(srv, testbed.Proc{Name: "haproxy (server)"}, bin, "-db", "-f", e.file("server.cfg"))
	if err != nil {
		return err
	}
	cp, err := e.startProxy(cli, testbed.Proc{Name: "haproxy (client)"}, bin, "-db", "-f", e.file("client.cfg"))
	if err != nil {
		return err
	}
	p.Client, p.Addr, p.Proxies = cli, "127.0.0.1:21001", []*testbed.Process{cp, sp}
	return nil
}

// haproxyConfig is Debian's HAProxy in TCP mode with defaults otherwise
// (threads = CPUs). maxconn is what fits the 20,000-fd hard limit here
// (two fds per proxied connection); HAProxy refuses to start otherwise.
func (e *env) haproxyConfig(body string) string {
	threads := ""
	if e.pin {
		threads = "  nbthread 1\n"
	}
	return `global
` + threads + `  maxconn 9800
  log stdout format raw local0 err
defaults
  mode tcp
  log global
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  maxconn 9800
` + body
}

func (e *env) file(name string) string { return filepath.Join(e.work, name) }

// meshPod makes a pod whose traffic ferry intercepts: a registered service
// with a transparent sidecar, `ferry redirect` and `ferry run` as UID 5995.
func (e *env) meshPod(bin, name, service string, port int, flags ...string) (*testbed.Pod, *testbed.Process, error) {
	pod, err := e.tb.NewPod(name)
	if err != nil {
		return nil, nil, err
	}
	if err := e.tunePod(pod); err != nil {
		return nil, nil, err
	}
	r, err := e.tb.RegisterService(testbed.Service{Name: service, Pod: pod, Port: port})
	if err != nil {
		return nil, nil, err
	}
	if out, err := e.exec(pod, testbed.Proc{Name: "ferry redirect"}, 30*time.Second, bin, "redirect",
		"-proxy-uid", strconv.Itoa(proxyUID), "-proxy-id", r.ProxyID); err != nil {
		return nil, nil, fmt.Errorf("ferry redirect: %v: %s", err, out)
	}
	pr, err := e.startProxy(pod, testbed.Proc{UID: proxyUID, Name: "ferry run (" + name + ")"}, append([]string{bin, "run", "-proxy-id", r.ProxyID}, flags...)...)
	if err != nil {
		return nil, nil, err
	}
	return pod, pr, nil
}

// setupFerryPT and setupFerryMTLS build a ferry path with binary bin; sfx
// keeps the pods and services of a second binary's paths apart.
func (e *env) setupFerryPT(p *path, plain, bin, sfx string) error {
	if why := e.ferryMissing(bin); why != "" {
		p.NA = why
		return nil
	}
	pod, pr, err := e.meshPod(bin, "fpt"+sfx, "bench-fpt"+sfx, 7000)
	if err != nil {
		return err
	}
	p.Client, p.Addr, p.Proxies, p.ferryPods = pod, plain, []*testbed.Process{pr}, []*testbed.Pod{pod}
	return nil
}

func (e *env) setupFerryMTLS(p *path, bin, sfx string, flags ...string) error {
	if why := e.ferryMissing(bin); why != "" {
		p.NA = why
		return nil
	}
	fsrv, err := e.tb.NewPod("fsrv" + sfx)
	if err != nil {
		return err
	}
	if err := e.server(fsrv, ":8080"); err != nil {
		return err
	}
	// meshPod for the server pod, reusing the pod made above.
	if err := e.tunePod(fsrv); err != nil {
		return err
	}
	r, err := e.tb.RegisterService(testbed.Service{Name: "bench-ferry" + sfx, Pod: fsrv, Port: 8080})
	if err != nil {
		return err
	}
	if out, err := e.exec(fsrv, testbed.Proc{}, 30*time.Second, bin, "redirect",
		"-proxy-uid", strconv.Itoa(proxyUID), "-proxy-id", r.ProxyID); err != nil {
		return fmt.Errorf("ferry redirect: %v: %s", err, out)
	}
	sp, err := e.startProxy(fsrv, testbed.Proc{UID: proxyUID, Name: "ferry run (fsrv" + sfx + ")"}, append([]string{bin, "run", "-proxy-id", r.ProxyID}, flags...)...)
	if err != nil {
		return err
	}
	cpod, cp, err := e.meshPod(bin, "fcli"+sfx, "bench-fcli"+sfx, 7000, flags...)
	if err != nil {
		return err
	}
	var vip string
	for range 100 {
		if vip, err = e.tb.VirtualIP("bench-ferry" + sfx); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	p.Client, p.Addr, p.Proxies, p.ferryPods = cpod, net.JoinHostPort(vip, "8080"), []*testbed.Process{cp, sp}, []*testbed.Pod{cpod, fsrv}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 600 {
		s = s[:600] + "…"
	}
	return s
}
