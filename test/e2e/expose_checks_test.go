package e2e

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestExposeChecksAgent: a service with an HTTP check whose sidecar asks
// for Expose.Checks becomes healthy in the real Consul agent through
// ferry: the agent runs the check against the port it allocated
// (21500...) on the proxy's address, ferry serves that port and forwards
// the check's request to the app. The agent here binds the bridge
// address, so that its checks come from its advertise address, the one
// source (with loopback) Consul lets reach a check listener.
func TestExposeChecksAgent(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	pod := tb.AddPod(t, "app")
	gw := tb.Gateway.String()
	var ports []int
	for range 7 {
		l, err := net.Listen("tcp", gw+":0")
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		l.Close()
	}
	agent := testbed.MustCommand(t, testbed.ConsulBinary(t), "agent", "-dev", "-node", "checks-"+tb.Name,
		"-bind", gw, "-client", gw, "-http-port", strconv.Itoa(ports[0]), "-dns-port", strconv.Itoa(ports[1]),
		"-grpc-port", strconv.Itoa(ports[2]), "-grpc-tls-port", strconv.Itoa(ports[3]),
		"-serf-lan-port", strconv.Itoa(ports[4]), "-serf-wan-port", strconv.Itoa(ports[5]),
		"-server-port", strconv.Itoa(ports[6]))
	var alog strings.Builder
	lw := &lockedWriter{b: &alog}
	agent.Stdout, agent.Stderr = lw, lw
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.Process.Kill(); agent.Wait() })
	httpAddr := net.JoinHostPort(gw, strconv.Itoa(ports[0]))
	client, err := api.NewClient(&api.Config{Address: httpAddr})
	if err != nil {
		t.Fatal(err)
	}
	meshPoll(t, "agent CA roots", 60*time.Second, func() bool {
		r, _, err := client.Agent().ConnectCARoots(nil)
		return err == nil && len(r.Roots) > 0
	})
	env := []string{"CONSUL_HTTP_ADDR=http://" + httpAddr}

	var hits atomic.Int64
	meshServeHTTP(t, pod, "127.0.0.1:8080", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/health" {
			http.NotFound(w, r)
			return
		}
		hits.Add(1)
		fmt.Fprint(w, "ok")
	})

	ip := pod.IP.String()
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web1", Name: "web", Port: 8080, Address: ip,
		Check: &api.AgentServiceCheck{HTTP: "http://127.0.0.1:8080/health", Interval: "1s"}}); err != nil {
		t.Fatal(err)
	}
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{Kind: api.ServiceKindConnectProxy,
		ID: "web1-sidecar-proxy", Name: "web-sidecar-proxy", Port: 20000, Address: ip,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", DestinationServiceID: "web1",
			LocalServiceAddress: "127.0.0.1", LocalServicePort: 8080, Mode: api.ProxyModeTransparent,
			Expose: api.ExposeConfig{Checks: true}}}); err != nil {
		t.Fatal(err)
	}
	status := func() (string, string) {
		cs, err := client.Agent().ChecksWithFilter(`ServiceID == "web1"`)
		if err != nil {
			return "", err.Error()
		}
		for _, c := range cs {
			return c.Status, fmt.Sprintf("exposed port %d: %s", c.ExposedPort, c.Output)
		}
		return "", "no check"
	}
	// Rerouted to the proxy, which is not there yet: critical.
	meshPoll(t, "check critical before ferry", 10*time.Second, func() bool {
		st, out := status()
		return st == api.HealthCritical && strings.Contains(out, "exposed port 215")
	})

	ferry := testbed.FerryBinary(t)
	pod.ExecOK(t, testbed.Proc{Name: "ferry redirect", Env: env}, ferry, "redirect",
		"-proxy-uid", strconv.Itoa(meshProxyUID), "-proxy-id", "web1-sidecar-proxy")
	pr := pod.Start(t, testbed.Proc{UID: meshProxyUID, Name: "ferry run", Env: env}, ferry, "run", "-proxy-id", "web1-sidecar-proxy")
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, out := status()
		if st == api.HealthPassing && hits.Load() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("check not passing through ferry: %s %s\nferry:\n%s", st, out, pr.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// lockedWriter lets two pipes of a process write one builder.
type lockedWriter struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}
