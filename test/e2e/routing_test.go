package e2e

import (
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Mesh routing end to end (issue 7): a meshed client pod reaches the
// service "backend" (two meshed pods) through its virtual IP, a ClusterIP
// (`virtual` tag), an explicit upstream and, DialedDirectly, its instance
// addresses; non-mesh hosts go plain passthrough until MeshDestinationsOnly.
//
//	client  (service "client", upstream backend on 127.0.0.1:9191)
//	back-a  (service "backend", app :8080, extra app port :9090 declared)
//	back-b  (service "backend", app :8080)
//	ext     (not in the mesh: echo :7000, and the outsider client)

const (
	rtAppPort   = 8080
	rtExtraPort = 9090
	rtUpstream  = "127.0.0.1:9191"
	rtExtPort   = "7000"
)

type rtEnv struct {
	tb                 *testbed.Testbed
	client, a, b, ext  *testbed.Pod
	clientFerry        *testbed.Process
	aApp, aExtra, bApp *testbed.Process
	bFerry             *testbed.Process
	vip, clusterIP     netip.Addr
}

func rtSetup(t *testing.T) *rtEnv {
	t.Helper()
	testbed.RequireRoot(t)
	e := &rtEnv{tb: testbed.New(t)}
	c := e.tb.Consul.Client
	e.client = e.tb.AddPod(t, "client")
	e.a = e.tb.AddPod(t, "back-a")
	e.b = e.tb.AddPod(t, "back-b")
	e.ext = e.tb.AddPod(t, "ext")

	// A ClusterIP outside the testbed's /24 (third octet flipped), still in
	// 198.18.0.0/15; nothing is ever sent to it: the client pod's rules
	// redirect it to ferry, which dials the backend's sidecars.
	a4 := e.tb.Subnet.Addr().As4()
	a4[2] ^= 0x80
	a4[3] = 10
	e.clusterIP = netip.AddrFrom4(a4)
	virtual := map[string]api.ServiceAddress{"virtual": {Address: e.clusterIP.String(), Port: 80}}

	// DialedDirectly as consul-k8s users set it: service-defaults.
	if _, _, err := c.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "backend",
		TransparentProxy: &api.TransparentProxyConfig{DialedDirectly: true}}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.ConfigEntries().Delete(api.ServiceDefaults, "backend", nil) })

	clientID := e.tb.Register(t, testbed.Service{Name: "client", Pod: e.client, Port: rtAppPort,
		Upstreams: []api.Upstream{{DestinationName: "backend", LocalBindPort: 9191},
			// The local datacenter named explicitly: the same instances.
			{DestinationName: "backend", LocalBindPort: 9192, Datacenter: "dc1"}}}).ProxyID
	aID := e.tb.Register(t, testbed.Service{Name: "backend", Pod: e.a, Port: rtAppPort, TaggedAddresses: virtual,
		ProxyConfig: map[string]any{"ferry_local_ports": []any{rtExtraPort}}}).ProxyID
	bID := e.tb.Register(t, testbed.Service{Name: "backend", Pod: e.b, Port: rtAppPort, TaggedAddresses: virtual}).ProxyID
	rtAssignManualVIP(t, c, e.clusterIP)

	meshPoll(t, "backend consul-virtual address", 10*time.Second, func() bool {
		s, err := e.tb.VirtualIP("backend")
		e.vip, _ = netip.ParseAddr(s)
		return err == nil
	})

	app := net.JoinHostPort("127.0.0.1", strconv.Itoa(rtAppPort))
	e.aApp = meshEchoServer(t, e.a, "back-a app", app)
	e.aExtra = meshEchoServer(t, e.a, "back-a app :9090", net.JoinHostPort("127.0.0.1", strconv.Itoa(rtExtraPort)))
	e.bApp = meshEchoServer(t, e.b, "back-b app", app)
	meshEchoServer(t, e.ext, "ext app", ":"+rtExtPort)

	meshSidecar(t, e.a, aID)
	e.bFerry = meshSidecar(t, e.b, bID)
	// Debug on the client: the catalog logs each failed instance dial.
	e.clientFerry = meshSidecar(t, e.client, clientID, "-log-level", "debug")
	return e
}

// rtAssignManualVIP does what consul-k8s does after registering: push the
// ClusterIP as a manual VIP. Consul < 1.16 has no such endpoint (and
// consul/api 1.20 no Internal().AssignServiceVirtualIP); the `virtual`
// tagged address alone must then route, so a failure here is only logged.
func rtAssignManualVIP(t *testing.T, c *api.Client, ip netip.Addr) {
	body := map[string]any{"Service": "backend", "ManualVIPs": []string{ip.String()}}
	var out map[string]any
	if _, err := c.Raw().Write("/v1/internal/service-virtual-ip", body, &out, nil); err != nil {
		t.Logf("manual VIP endpoint unavailable (relying on the virtual tag): %v", err)
		return
	}
	t.Logf("manual VIP assigned: %v", out)
}

// rtEcho runs one echo round trip (or conns parallel ones) from the client
// pod and fails the test unless all of them verified.
func (e *rtEnv) rtEcho(t *testing.T, addr string, bytes, conns int) string {
	t.Helper()
	out, err := meshEchoClient(t, e.client, addr, bytes, conns, "-timeout", "20s")
	if err != nil || !strings.HasPrefix(out, "ok ") {
		t.Fatalf("echo client -> %s: %v\n%s\nclient ferry:\n%s", addr, err, out, rtTail(e.clientFerry.Output(), 30))
	}
	return out
}

func TestRouting(t *testing.T) {
	e := rtSetup(t)
	vip := net.JoinHostPort(e.vip.String(), strconv.Itoa(rtAppPort))
	backends := func() (int, int) { return meshAccepts(e.aApp), meshAccepts(e.bApp) }
	// settled waits until the two apps' accept lines have grown by want in
	// total: a line reaches the test through the process's output pipe a
	// moment after the connection, which under load can be after the client
	// has finished. The per-app split is then checked by the caller.
	settled := func(t *testing.T, a0, b0, want int) (int, int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			a, b := backends()
			if a-a0+b-b0 >= want || time.Now().After(deadline) {
				return a, b
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	t.Run("explicit upstream on 127.0.0.1:9191", func(t *testing.T) {
		a0, b0 := backends()
		e.rtEcho(t, rtUpstream, 64<<10, 4)
		a1, b1 := settled(t, a0, b0, 4)
		if got := a1 - a0 + b1 - b0; got != 4 {
			t.Fatalf("backends accepted %d connections, want 4", got)
		}
		e.rtEcho(t, "127.0.0.1:9192", 4096, 2)
		if a2, b2 := settled(t, a1, b1, 2); a2-a1+b2-b1 != 2 {
			t.Fatalf("upstream with Datacenter dc1: backends accepted %d, want 2", a2-a1+b2-b1)
		}
		out := e.rtEcho(t, rtUpstream, 100<<20, 1)
		t.Logf("explicit upstream, 100 MiB each way through two sidecars over mTLS: %s", strings.TrimSpace(out))
	})

	t.Run("40 connections to the virtual IP share two instances", func(t *testing.T) {
		a0, b0 := backends()
		e.rtEcho(t, vip, 1024, 40)
		a1, b1 := settled(t, a0, b0, 40)
		da, db := a1-a0, b1-b0
		t.Logf("balance over %s: back-a %d, back-b %d", vip, da, db)
		if da+db != 40 || da < 12 || db < 12 {
			t.Fatalf("40 connections split %d/%d; want about even (each >= 12)", da, db)
		}
	})

	t.Run("ClusterIP (virtual tag) routes to backend", func(t *testing.T) {
		a0, b0 := backends()
		e.rtEcho(t, net.JoinHostPort(e.clusterIP.String(), "80"), 4096, 2)
		a1, b1 := settled(t, a0, b0, 2)
		if got := a1 - a0 + b1 - b0; got != 2 {
			t.Fatalf("backends accepted %d connections through the ClusterIP, want 2", got)
		}
	})

	t.Run("DialedDirectly instance address over mTLS; a plain outsider is refused", func(t *testing.T) {
		a0, b0 := backends()
		e.rtEcho(t, net.JoinHostPort(e.a.IP.String(), strconv.Itoa(rtAppPort)), 4096, 3)
		a1, b1 := settled(t, a0, b0, 3)
		if a1-a0 != 3 || b1 != b0 {
			t.Fatalf("direct to back-a: back-a +%d back-b +%d, want +3 +0", a1-a0, b1-b0)
		}
		ok := meshMetric(t, e.a, `ferry_connections_total{direction="inbound",outcome="ok"}`)
		if ok < 3 {
			t.Fatalf("back-a's sidecar counted %d inbound ok connections; the direct dial bypassed it", ok)
		}
		out, err := meshEchoClient(t, e.ext, net.JoinHostPort(e.a.IP.String(), strconv.Itoa(rtAppPort)), 1024, 1, "-timeout", "5s")
		if err == nil {
			t.Fatalf("a plain client outside the mesh reached back-a's app: %s", out)
		}
		// Nothing to wait for on a connection that never arrives: follow
		// it with a known-good one and require that to be the only new
		// accept.
		e.rtEcho(t, net.JoinHostPort(e.a.IP.String(), strconv.Itoa(rtAppPort)), 1024, 1)
		if a2, _ := settled(t, a1, b1, 1); a2 != a1+1 {
			t.Fatalf("back-a's app accepted the outsider's connection (%d new accepts, want 1)", a2-a1)
		}
	})

	t.Run("multi-port: declared extra port reaches it, undeclared goes to LocalServicePort", func(t *testing.T) {
		x0, a0 := meshAccepts(e.aExtra), meshAccepts(e.aApp)
		e.rtEcho(t, net.JoinHostPort(e.a.IP.String(), strconv.Itoa(rtExtraPort)), 4096, 1)
		twoApps := func() (int, int) { return meshAccepts(e.aExtra), meshAccepts(e.aApp) }
		meshPoll(t, "an accept line from either app", 10*time.Second, func() bool {
			x, a := twoApps()
			return x-x0+a-a0 >= 1
		})
		if x1, a1 := twoApps(); x1-x0 != 1 || a1 != a0 {
			t.Fatalf("to :%d: extra app +%d, main app +%d; want +1 +0", rtExtraPort, x1-x0, a1-a0)
		}
		x0, a0 = meshAccepts(e.aExtra), meshAccepts(e.aApp)
		e.rtEcho(t, net.JoinHostPort(e.a.IP.String(), "9999"), 4096, 1)
		meshPoll(t, "an accept line from either app", 10*time.Second, func() bool {
			x, a := twoApps()
			return x-x0+a-a0 >= 1
		})
		if x1, a1 := twoApps(); x1 != x0 || a1-a0 != 1 {
			t.Fatalf("to :9999: extra app +%d, main app +%d; want +0 +1", x1-x0, a1-a0)
		}
	})

	t.Run("passthrough, then MeshDestinationsOnly rejects it; mesh traffic unaffected", func(t *testing.T) {
		c := e.tb.Consul.Client
		ext := net.JoinHostPort(e.ext.IP.String(), rtExtPort)
		e.rtEcho(t, ext, 64<<10, 2)

		setMeshOnly := func(on bool) {
			_, _, err := c.ConfigEntries().Set(&api.MeshConfigEntry{
				TransparentProxy: api.TransparentProxyMeshConfig{MeshDestinationsOnly: on}}, nil)
			if err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { c.ConfigEntries().Delete(api.MeshConfig, api.MeshConfigMesh, nil) })
		rejected := `ferry_connections_total{direction="outbound",outcome="rejected"}`
		r0 := meshMetric(t, e.client, rejected)
		setMeshOnly(true)
		var refusal string
		took := meshPoll(t, "passthrough refused", 10*time.Second, func() bool {
			out, err := meshEchoClient(t, e.client, ext, 1024, 1, "-timeout", "5s")
			refusal = strings.TrimSpace(out)
			return err != nil
		})
		t.Logf("MeshDestinationsOnly applied within %v; the app saw: %s", took.Round(time.Millisecond), refusal)
		if r1 := meshMetric(t, e.client, rejected); r1 <= r0 {
			t.Fatalf("rejected metric %d -> %d", r0, r1)
		}
		if !strings.Contains(e.clientFerry.Output(), "outbound connection rejected") {
			t.Fatalf("no rejection log line:\n%s", rtTail(e.clientFerry.Output(), 20))
		}
		e.rtEcho(t, vip, 4096, 4)
		e.rtEcho(t, rtUpstream, 4096, 1)

		setMeshOnly(false)
		meshPoll(t, "passthrough back", 10*time.Second, func() bool {
			_, err := meshEchoClient(t, e.client, ext, 1024, 1, "-timeout", "5s")
			return err == nil
		})
	})

	t.Run("a second service claiming backend's ClusterIP makes it refused, not hijacked", func(t *testing.T) {
		// Audit F1: any registration can set a `virtual` tag. Another
		// service claiming backend's ClusterIP must not take it over.
		cip := net.JoinHostPort(e.clusterIP.String(), "80")
		ambiguous := `ferry_connections_total{direction="outbound",outcome="ambiguous"}`
		n0 := meshMetric(t, e.client, ambiguous)
		evil := e.tb.Register(t, testbed.Service{Name: "evil", Pod: e.ext, Port: 7000,
			TaggedAddresses: map[string]api.ServiceAddress{"virtual": {Address: e.clusterIP.String(), Port: 80}}})
		took := meshPoll(t, "contested ClusterIP refused", 10*time.Second, func() bool {
			_, err := meshEchoClient(t, e.client, cip, 1024, 1, "-timeout", "5s")
			return err != nil
		})
		t.Logf("ClusterIP refused %v after evil claimed it", took.Round(time.Millisecond))
		if n := meshMetric(t, e.client, ambiguous); n <= n0 {
			t.Fatalf("%s %d -> %d", ambiguous, n0, n)
		}
		if c := meshMetric(t, e.client, "ferry_catalog_address_conflicts"); c != 1 {
			t.Fatalf("ferry_catalog_address_conflicts = %d, want 1", c)
		}
		out := e.clientFerry.Output()
		if !strings.Contains(out, "address claimed by more than one service") || !strings.Contains(out, "backend, evil") {
			t.Fatalf("no conflict log line naming both services:\n%s", rtTail(out, 20))
		}
		e.rtEcho(t, vip, 4096, 2) // backend's consul-virtual is not contested

		e.tb.Deregister(evil)
		meshPoll(t, "ClusterIP routes again once the claim is gone", 10*time.Second, func() bool {
			out, err := meshEchoClient(t, e.client, cip, 1024, 1, "-timeout", "5s")
			return err == nil && strings.HasPrefix(out, "ok ")
		})
	})

	t.Run("instance killed (still passing): 30 connections all succeed", func(t *testing.T) {
		// Kill back-b's app and sidecar without deregistering: the
		// catalog still lists it as passing; its pod's rules still
		// redirect to the dead inbound port, so dials there are refused.
		a0 := meshAccepts(e.aApp)
		killed := time.Now()
		for _, pr := range []*testbed.Process{e.bFerry, e.bApp} {
			pr.Signal(syscall.SIGKILL)
			if err := pr.Wait(5 * time.Second); err == nil {
				t.Fatalf("%s exited cleanly after SIGKILL?", pr.Name)
			}
		}
		// One connection every 400ms (on a fixed schedule, so a slow machine
		// does not stretch it) for ~12s: long enough to see the dead
		// instance come out of its first backoff (5s) and be retried.
		var failed []string
		var slowest time.Duration
		for i := range 30 {
			time.Sleep(time.Until(killed.Add(time.Duration(i) * 400 * time.Millisecond)))
			out, err := meshEchoClient(t, e.client, vip, 4096, 1, "-timeout", "10s")
			if err != nil {
				failed = append(failed, strconv.Itoa(i)+": "+strings.TrimSpace(out))
			}
			slowest = max(slowest, rtElapsedOf(out))
		}
		elapsed := time.Since(killed)
		if len(failed) > 0 {
			t.Fatalf("%d of 30 connections failed after back-b died:\n%s\nclient ferry:\n%s",
				len(failed), strings.Join(failed, "\n"), rtTail(e.clientFerry.Output(), 30))
		}
		if got := meshAcceptsAtLeast(t, e.aApp, a0+30) - a0; got != 30 {
			t.Fatalf("back-a accepted %d, want 30", got)
		}
		retries := rtDialFailures(e.clientFerry.Output(), e.b.IP.String(), killed)
		t.Logf("30/30 ok over %v (slowest %v); dials to dead back-b retried on back-a at %v after the kill",
			elapsed.Round(time.Millisecond), slowest, retries)
		if len(retries) == 0 {
			t.Fatalf("no failed dial to back-b logged: did the balancer never pick it?\n%s", rtTail(e.clientFerry.Output(), 30))
		}
	})

	t.Run("instance unreachable (SYNs dropped): connections still succeed, one waits a dial timeout", func(t *testing.T) {
		// back-b's pod now drops everything, as a vanished node would:
		// a dial there fails only by the catalog's dial timeout.
		e.b.ExecOK(t, testbed.Proc{}, "ip", "link", "set", "eth0", "down")
		start := time.Now()
		var slowest time.Duration
		n := 0
		for len(rtDialFailures(e.clientFerry.Output(), e.b.IP.String(), start)) == 0 {
			// Its backoff is 10s after the second failure above, 20s after
			// a third (a slow run); 45s covers both.
			if time.Since(start) > 45*time.Second {
				t.Fatalf("back-b never retried within 45s (its backoff should have ended)")
			}
			out := e.rtEcho(t, vip, 4096, 1)
			n++
			slowest = max(slowest, rtElapsedOf(out))
			time.Sleep(250 * time.Millisecond)
		}
		t.Logf("%d/%d ok while back-b was unreachable; slowest connection %v (the one that hit back-b first)", n, n, slowest)
	})
}

var rtElapsed = regexp.MustCompile(`elapsed=(\S+)`)

// rtElapsedOf reads the echo client's "elapsed=" figure (0 if absent).
func rtElapsedOf(out string) time.Duration {
	if m := rtElapsed.FindStringSubmatch(out); m != nil {
		d, _ := time.ParseDuration(m[1])
		return d
	}
	return 0
}

var rtLogTime = regexp.MustCompile(`^(\S+) \[DEBUG\]`)

// rtDialFailures returns, relative to since, when (since then) the catalog
// logged a failed dial to an instance at ip (hclog's default timestamp
// layout).
func rtDialFailures(log, ip string, since time.Time) []time.Duration {
	var out []time.Duration
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, "instance dial failed") || !strings.Contains(l, ip+":") {
			continue
		}
		m := rtLogTime.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", m[1])
		if err != nil || ts.Before(since.Truncate(time.Millisecond)) {
			continue
		}
		out = append(out, ts.Sub(since).Round(10*time.Millisecond))
	}
	return out
}

func rtTail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}
