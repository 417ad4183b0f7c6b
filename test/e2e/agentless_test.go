package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// TestAgentlessMesh: frontend -> backend by virtual IP through two ferry
// sidecars started with consul-k8s's consul-dataplane command line,
// registered in the catalog only, logged in through the auth method, on
// the three-server TLS+ACL cluster; default deny, then allow.
func TestAgentlessMesh(t *testing.T) {
	m := alSetup(t)
	fe := m.alPodFor(t, "frontend", "frontend", func(s *testbed.K8sService) {
		// consul.hashicorp.com/connect-service-upstreams: backend:9191
		s.Upstreams = []api.Upstream{{DestinationName: "backend", LocalBindPort: 9191}}
	})
	be := m.alPodFor(t, "backend", "backend", nil)
	app := meshEchoServer(t, be.Pod, "backend app", "127.0.0.1:8080")
	m.start(t, fe, false)
	m.start(t, be, false)
	vip := m.vip(t, "backend")
	outer := t

	t.Run("default deny", func(t *testing.T) {
		out, err := meshEchoClient(t, fe.Pod, vip, 1024, 1, "-timeout", "5s")
		if err == nil {
			t.Fatalf("connection allowed without an intention:\n%s", out)
		}
		if n := meshAccepts(app); n != 0 {
			t.Fatalf("backend app accepted %d connections", n)
		}
	})
	t.Run("allow", func(t *testing.T) {
		m.c.SetIntention(t, "frontend", "backend", api.IntentionActionAllow)
		meshPoll(t, "allowed connection", 15e9, func() bool {
			_, err := meshEchoClient(t, fe.Pod, vip, 1024, 1, "-timeout", "5s")
			return err == nil
		})
		if out, err := meshEchoClient(t, fe.Pod, vip, 64<<10, 4); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	t.Run("explicit upstream", func(t *testing.T) {
		if out, err := meshEchoClient(t, fe.Pod, "127.0.0.1:9191", 4096, 2); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	t.Run("live registration change", func(t *testing.T) {
		// The endpoints controller re-registers the pod (the upstream
		// annotation now says backend:9292): ferry follows the catalog
		// without a restart.
		// Registered for the whole test (the subtest's cleanup would
		// deregister the pod).
		m.c.RegisterK8s(outer, testbed.K8sService{Name: "frontend", Pod: fe.Pod, Port: alAppPort, UID: fe.UID,
			Upstreams: []api.Upstream{{DestinationName: "backend", LocalBindPort: 9292}}})
		meshPoll(t, "new upstream listener", 15e9, func() bool {
			_, err := meshEchoClient(t, fe.Pod, "127.0.0.1:9292", 1024, 1, "-timeout", "5s")
			return err == nil
		})
	})
	t.Run("dialed directly", func(t *testing.T) {
		// From central config only, as in consul-k8s (the registration has
		// no TransparentProxy block); the backend app must listen on the
		// pod IP for a direct dial.
		meshEchoServer(t, be.Pod, "backend app (pod IP)", be.Pod.IP.String()+":8080")
		if _, _, err := m.c.Client.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "backend",
			TransparentProxy: &api.TransparentProxyConfig{DialedDirectly: true}}, nil); err != nil {
			t.Fatal(err)
		}
		addr := be.Pod.IP.String() + ":8080"
		inbound := func() int64 { return dnsMetricSum(t, be.Pod, `ferry_connections_total{direction="inbound"`) }
		before := inbound()
		meshPoll(t, "direct dial through the mesh", 15e9, func() bool {
			_, err := meshEchoClient(t, fe.Pod, addr, 1024, 1, "-timeout", "5s")
			return err == nil
		})
		// It went through the backend's sidecar (mTLS), not around it.
		if inbound() == before {
			t.Fatal("the direct dial did not go through the backend's sidecar")
		}
	})
	t.Run("dns", func(t *testing.T) {
		tool := dnsBuildApp(t)
		q := func(t *testing.T, name, typ string, tcp bool) string {
			args := []string{tool, "query", "-server", "127.0.0.1:8600"}
			if tcp {
				args = append(args, "-tcp")
			}
			return fe.Pod.ExecOK(t, testbed.Proc{}, append(args, name, typ)...)
		}
		ip := m.c.VirtualIP(t, "backend")
		for _, tcp := range []bool{false, true} {
			// Mesh names: ferry's own answer, the VIP.
			if out := q(t, "backend.virtual.consul", "A", tcp); !strings.Contains(out, ip) {
				t.Errorf("backend.virtual.consul (tcp %v): %s, want %s", tcp, out, ip)
			}
			// Other .consul names go to the servers' DNS.
			out := q(t, "consul.service.consul", "A", tcp)
			for _, s := range m.c.Servers {
				if !strings.Contains(out, s.Pod.IP.String()) {
					t.Errorf("consul.service.consul (tcp %v): %s, want every server", tcp, out)
				}
			}
			if out := q(t, "backend.service.consul", "SRV", tcp); !strings.Contains(out, "NOERROR") || !strings.Contains(out, "SRV") {
				t.Errorf("backend.service.consul SRV (tcp %v): %s", tcp, out)
			}
		}
	})
	t.Run("proxy-defaults merged live", func(t *testing.T) {
		// Central config reaches ferry through merge-central-config, and a
		// change to it is followed like a registration change.
		if _, _, err := m.c.Client.ConfigEntries().Set(&api.ProxyConfigEntry{Kind: api.ProxyDefaults, Name: api.ProxyConfigGlobal,
			TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: 15002}}, nil); err != nil {
			t.Fatal(err)
		}
		if err := fe.Sidecar.WaitOutput("outbound=[127.0.0.1:15002", 15*time.Second); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("login token meta", func(t *testing.T) {
		toks, _, err := m.c.Client.ACL().TokenList(nil)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, tk := range toks {
			if tk.AuthMethod == m.am.Name && strings.Contains(tk.Description, `"pod-uid":"`+fe.UID+`"`) &&
				strings.Contains(tk.Description, `"pod":"default/frontend"`) {
				found = true
			}
		}
		if !found {
			t.Fatalf("no login token with the frontend's pod meta among %d tokens", len(toks))
		}
	})
}

// alTokens returns the login tokens of pod (by its pod-uid login meta).
func alTokens(t *testing.T, m *alMesh, p *alPod) []*api.ACLTokenListEntry {
	t.Helper()
	toks, _, err := m.c.Client.ACL().TokenList(nil)
	if err != nil {
		t.Fatal(err)
	}
	var out []*api.ACLTokenListEntry
	for _, tk := range toks {
		if tk.AuthMethod == m.am.Name && strings.Contains(tk.Description, `"pod-uid":"`+p.UID+`"`) {
			out = append(out, tk)
		}
	}
	return out
}

// TestAgentlessLogin: a login token deleted under ferry (as consul-k8s's
// endpoints controller deletes a pod's tokens) makes it log in again and
// keep serving, with the watches working on the new token; SIGTERM logs
// the token out.
func TestAgentlessLogin(t *testing.T) {
	m := alSetup(t)
	fe, be, vip := m.frontendBackend(t)
	connect := func() error {
		_, err := meshEchoClient(t, fe.Pod, vip, 1024, 1, "-timeout", "5s")
		return err
	}
	meshPoll(t, "first connection", 15*time.Second, func() bool { return connect() == nil })

	// Delete both sidecars' tokens.
	for _, p := range []*alPod{fe, be} {
		toks := alTokens(t, m, p)
		if len(toks) != 1 {
			t.Fatalf("%s has %d login tokens, want 1", p.Pod.Name, len(toks))
		}
		if _, err := m.c.Client.ACL().TokenDelete(toks[0].AccessorID, nil); err != nil {
			t.Fatal(err)
		}
	}
	// A catalog change wakes the blocking queries, which now fail with
	// "ACL not found" (otherwise the periodic token check notices).
	other := m.tb.AddPod(t, "other")
	m.c.RegisterK8s(t, testbed.K8sService{Name: "other", Pod: other, Port: alAppPort})
	for _, p := range []*alPod{fe, be} {
		meshPoll(t, p.Pod.Name+" logs in again", 40*time.Second, func() bool {
			return meshMetric(t, p.Pod, "ferry_consul_logins_total") >= 2
		})
		if n := len(alTokens(t, m, p)); n != 1 {
			t.Fatalf("%s has %d login tokens after the re-login, want 1", p.Pod.Name, n)
		}
	}
	if err := connect(); err != nil {
		t.Fatalf("after re-login: %v", err)
	}
	// The watches work with the new token: a new intention applies.
	m.c.SetIntention(t, "frontend", "backend", api.IntentionActionDeny)
	meshPoll(t, "deny after re-login", 15*time.Second, func() bool { return connect() != nil })

	// SIGTERM: ferry logs out, leaving no token behind. consul-k8s's
	// arguments turn lifecycle on with a 30 s shutdown grace period, in
	// which outbound keeps working: the exit (and the logout) follows it.
	if err := fe.Sidecar.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := fe.Sidecar.Wait(60 * time.Second); err != nil {
		t.Fatalf("sidecar after SIGTERM: %v\n%s", err, fe.Sidecar.Output())
	}
	if toks := alTokens(t, m, fe); len(toks) != 0 {
		t.Fatalf("%d login tokens left after SIGTERM", len(toks))
	}
	if !strings.Contains(fe.Sidecar.Output(), "logged out") {
		t.Fatalf("no logout in the log:\n%s", fe.Sidecar.Output())
	}
}
