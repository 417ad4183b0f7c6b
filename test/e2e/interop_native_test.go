package e2e

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestMTLSInteropConnectNative runs connect-native apps built from Consul's
// own connect package (v1.14.11) opposite ferry, with tunnels on (the
// default). Their TLS configs offer and serve ALPN h2: ferry must neither
// refuse their ClientHello nor be refused by their server for offering its
// tunnel protocol (audit F5).
func TestMTLSInteropConnectNative(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	native := testbed.ConnectNativeBinary(t)
	frontend, backend := tb.AddPod(t, "frontend"), tb.AddPod(t, "backend")
	apiPod, webPod := tb.AddPod(t, "api"), tb.AddPod(t, "web")
	fr := tb.Register(t, testbed.Service{Name: "frontend", Pod: frontend, Port: mtAppPort})
	br := tb.Register(t, testbed.Service{Name: "backend", Pod: backend, Port: mtAppPort})
	const nativePort = 8443
	tb.Register(t, testbed.Service{Name: "api", Pod: apiPod, Port: nativePort, Native: true})
	tb.Register(t, testbed.Service{Name: "web", Pod: webPod, Port: nativePort, Native: true})

	backendApp := meshEchoServer(t, backend, "backend app", "127.0.0.1:"+strconv.Itoa(mtAppPort))
	apiApp := apiPod.Start(t, testbed.Proc{Name: "connect-native api"}, native, "server",
		"-service", "api", "-addr", ":"+strconv.Itoa(nativePort))
	if err := apiApp.WaitOutput("ready", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	fe := meshSidecar(t, frontend, fr.ProxyID, "-log-level", "debug")
	be := meshSidecar(t, backend, br.ProxyID, "-log-level", "debug")

	t.Run("ferry to a connect-native server offering h2", func(t *testing.T) {
		vip := net.JoinHostPort(meshVIP(t, tb, "api"), strconv.Itoa(nativePort))
		// The first connections to the instance may each be refused once
		// (ferry offers its tunnel protocol, the server serves only h2)
		// and retried without ALPN; then ferry remembers the instance.
		for round := range 2 {
			refusedBefore := strings.Count(apiApp.Output(), "handshake ")
			out, err := meshEchoClient(t, frontend, vip, 1<<20, 3, "-timeout", "10s")
			if err != nil {
				t.Fatalf("round %d: frontend -> native api %s: %v\n%s\nfrontend sidecar:\n%s\napi:\n%s", round, vip, err, out, fe.Output(), apiApp.Output())
			}
			refused := strings.Count(apiApp.Output(), "handshake ") - refusedBefore
			t.Logf("round %d: frontend -> native api: %s (%d handshakes refused for ALPN, retried)", round, strings.TrimSpace(out), refused)
			if round == 1 && refused > 0 {
				t.Fatalf("ferry offered its tunnel protocol again to an instance that refused it:\n%s", apiApp.Output())
			}
		}
		if !strings.Contains(apiApp.Output(), `accept 1 `) && !strings.Contains(apiApp.Output(), "\naccept ") {
			t.Fatalf("native api accepted no mTLS connection:\n%s", apiApp.Output())
		}
	})

	t.Run("a connect-native client offering h2 to ferry", func(t *testing.T) {
		accepts := meshAccepts(backendApp)
		addr := net.JoinHostPort(backend.IP.String(), "20000")
		out, err := webPod.Exec(t, testbed.Proc{Name: "connect-native web"}, native, "client",
			"-service", "web", "-addr", addr, "-target", "backend", "-bytes", strconv.Itoa(1<<20))
		if err != nil {
			t.Fatalf("native web -> backend's ferry: %v\n%s\nbackend sidecar:\n%s", err, out, be.Output())
		}
		t.Logf("native web -> backend: %s", strings.TrimSpace(out))
		meshAcceptsAtLeast(t, backendApp, accepts+1)
		if !meshLogHas(be, "inbound connection authorized", "/svc/web") {
			t.Fatalf("backend ferry did not authorize the native web identity:\n%s", be.Output())
		}
	})
}
