package e2e

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// Helpers for agentless tests: pods registered in the catalog as
// consul-k8s registers them, ferry started with consul-k8s's own sidecar
// command line (consul-dataplane argv and DP_* env) against the
// three-server TLS+ACL cluster.

const alAppPort = 8080

// alMesh is a cluster with the jwt auth method.
type alMesh struct {
	tb *testbed.Testbed
	c  *testbed.Cluster
	am *testbed.AuthMethod
}

func alSetup(t *testing.T) *alMesh {
	t.Helper()
	testbed.RequireRoot(t)
	tb, c := testbed.NewCluster(t)
	return &alMesh{tb: tb, c: c, am: c.CreateAuthMethod(t, "ferry-k8s-auth-method")}
}

// alPod is a meshed pod: its registration and the files consul-k8s's
// connect-init and kubelet leave for the sidecar.
type alPod struct {
	Pod     *testbed.Pod
	Service string
	Reg     testbed.K8sRegistered
	UID     string
	Dir     string // /consul/connect-inject stand-in: proxyid, consul-ca.pem, token
	Sidecar *testbed.Process
}

// alPodFor creates a pod for service, registers it and writes its files.
func (m *alMesh) alPodFor(t *testing.T, name, service string, extra func(*testbed.K8sService)) *alPod {
	t.Helper()
	pod := m.tb.AddPod(t, name)
	ks := testbed.K8sService{Name: service, Pod: pod, Port: alAppPort, UID: "uid-" + name}
	if extra != nil {
		extra(&ks)
	}
	reg := m.c.RegisterK8s(t, ks)
	dir, err := os.MkdirTemp("", "ferry-al-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	ca, err := os.ReadFile(m.c.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	for f, data := range map[string]string{
		"proxyid":          reg.ProxyID,
		"consul-ca.pem":    string(ca),
		"token":            m.am.Token(t, service),
		"consul-dataplane": "",
	} {
		if f == "consul-dataplane" {
			// The image's second name for the binary.
			if err := os.Symlink(testbed.FerryBinary(t), filepath.Join(dir, f)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, f), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &alPod{Pod: pod, Service: service, Reg: reg, UID: ks.UID, Dir: dir}
}

// dataplaneArgs is consul-k8s 1.x's sidecar argument list with ACLs (login)
// and TLS, lifecycle and metrics on, consul DNS on (webhook
// consul_dataplane_sidecar.go), with -addresses as exec= (there is no
// cluster DNS here) naming the servers.
func (m *alMesh) dataplaneArgs(p *alPod, extra ...string) []string {
	ips := strings.ReplaceAll(m.c.Addresses(), ",", " ")
	args := []string{
		filepath.Join(p.Dir, "consul-dataplane"),
		"-addresses", "exec=echo " + ips,
		"-envoy-admin-bind-address=127.0.0.1", "-consul-dns-bind-addr=127.0.0.1", "-xds-bind-addr=127.0.0.1",
		"-grpc-port=8502", "-proxy-service-id-path=" + filepath.Join(p.Dir, "proxyid"),
		"-log-level=info", "-log-json=false", "-envoy-concurrency=2",
		"-graceful-addr=127.0.0.1",
		"-credential-type=login", "-login-auth-method=" + m.am.Name,
		"-login-bearer-token-path=" + filepath.Join(p.Dir, "token"),
		"-tls-server-name=" + m.c.ServerName, "-ca-certs=" + filepath.Join(p.Dir, "consul-ca.pem"),
		"-graceful-port=20600", "-shutdown-drain-listeners", "-shutdown-grace-period-seconds=30",
		"-graceful-shutdown-path=/graceful_shutdown", "-startup-grace-period-seconds=0",
		"-graceful-startup-path=/graceful_startup", "-telemetry-prom-scrape-path=/metrics",
		"-consul-dns-bind-port=8600",
	}
	return append(args, extra...)
}

func (p *alPod) dataplaneEnv() []string {
	return []string{
		"TMPDIR=" + p.Dir, "NODE_NAME=node1", "DP_SERVICE_NODE_NAME=node1-virtual",
		"POD_NAME=" + p.Pod.Name, "POD_NAMESPACE=default", "POD_UID=" + p.UID,
		"DP_CREDENTIAL_LOGIN_META=pod=default/" + p.Pod.Name,
		"DP_CREDENTIAL_LOGIN_META1=pod=default/" + p.Pod.Name,
		"DP_CREDENTIAL_LOGIN_META2=pod-uid=" + p.UID,
	}
}

// start installs the redirect rules (as consul-k8s's connect-init would)
// and starts the sidecar; it waits for /ready unless noWait.
func (m *alMesh) start(t *testing.T, p *alPod, noWait bool, extra ...string) *testbed.Process {
	t.Helper()
	ferry := testbed.FerryBinary(t)
	if p.Sidecar == nil {
		p.Pod.ExecOK(t, testbed.Proc{Name: "ferry redirect"}, ferry, "redirect",
			"-proxy-uid", strconv.Itoa(meshProxyUID), "-proxy-inbound-port", "20000",
			"-exclude-inbound-port", "19000")
	}
	pr := p.Pod.Start(t, testbed.Proc{UID: meshProxyUID, Name: "ferry (consul-dataplane) " + p.Pod.Name, Env: p.dataplaneEnv()},
		m.dataplaneArgs(p, extra...)...)
	p.Sidecar = pr
	if noWait {
		return pr
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := meshAdminGet(t, p.Pod, "/ready")
		if code == 200 {
			return pr
		}
		select {
		case <-pr.Done():
			t.Fatalf("ferry in %s exited before ready:\n%s", p.Pod.Name, pr.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("ferry in %s not ready after 30s: %d %s\n%s", p.Pod.Name, code, body, pr.Output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// vip is service's virtual IP with the app port.
func (m *alMesh) vip(t *testing.T, service string) string {
	return net.JoinHostPort(m.c.VirtualIP(t, service), strconv.Itoa(alAppPort))
}

// frontendBackend starts agentless ferry in a frontend and a backend pod,
// an echo app in the backend and an intention that allows the frontend:
// the pair most agentless tests start from. vip is the backend's virtual
// address.
func (m *alMesh) frontendBackend(t *testing.T) (fe, be *alPod, vip string) {
	t.Helper()
	fe = m.alPodFor(t, "frontend", "frontend", nil)
	be = m.alPodFor(t, "backend", "backend", nil)
	meshEchoServer(t, be.Pod, "backend app", "127.0.0.1:8080", "-quiet")
	m.c.SetIntention(t, "frontend", "backend", api.IntentionActionAllow)
	m.start(t, fe, false)
	m.start(t, be, false)
	return fe, be, m.vip(t, "backend")
}
