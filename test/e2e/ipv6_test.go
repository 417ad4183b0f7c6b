package e2e

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/test/testbed"
)

// Dual-stack pods end to end (issue 20): every pod has an IPv4 address and
// a global IPv6 one (2001:db8::/32, default route into the sink) besides its
// link-local address. The meshed pods are as locked down over IPv6 as over
// IPv4, and their apps' IPv6 connections go through ferry.
//
//	client6  (service "client6", upstream backend6 on [::1]:9291)
//	back6    (service "backend6", registered with its IPv6 address;
//	          app on :8080, all addresses, so that only the rules stand
//	          between a plain client and it)
//	ext6     (not in the mesh: echo on :7000, and the outsider client)

const (
	v6AppPort  = "8080"
	v6ExtPort  = "7000"
	v6Upstream = "[::1]:9291"
)

type v6Env struct {
	tb                  *testbed.Testbed
	client, back, ext   *testbed.Pod
	clientFerry, bFerry *testbed.Process
	bApp, extApp        *testbed.Process
	backLL, extLL       netip.Addr
}

func v6Setup(t *testing.T) *v6Env {
	t.Helper()
	testbed.RequireRoot(t)
	e := &v6Env{tb: testbed.New(t)}
	c := e.tb.Consul.Client
	e.client = e.tb.AddPod(t, "client6")
	e.back = e.tb.AddPod(t, "back6")
	e.ext = e.tb.AddPod(t, "ext6")
	for _, p := range []*testbed.Pod{e.client, e.back, e.ext} {
		p.AddIPv6(t)
	}
	e.backLL = e.back.LinkLocalIPv6(t)
	e.extLL = e.ext.LinkLocalIPv6(t)

	if _, _, err := c.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "backend6",
		TransparentProxy: &api.TransparentProxyConfig{DialedDirectly: true}}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.ConfigEntries().Delete(api.ServiceDefaults, "backend6", nil) })
	clientID := e.tb.Register(t, testbed.Service{Name: "client6", Pod: e.client, Port: 8080, Address: e.client.IP6,
		Upstreams: []api.Upstream{{DestinationName: "backend6", LocalBindAddress: "::1", LocalBindPort: 9291}}}).ProxyID
	backID := e.tb.Register(t, testbed.Service{Name: "backend6", Pod: e.back, Port: 8080, Address: e.back.IP6}).ProxyID

	e.bApp = meshEchoServer(t, e.back, "back6 app", ":"+v6AppPort) // Go's ":port" is dual-stack
	e.extApp = meshEchoServer(t, e.ext, "ext6 app", ":"+v6ExtPort)

	// Control: before the rules, a plain client reaches the app over
	// both IPv6 addresses (so that the lock-down below means something).
	for _, dst := range e.backApp6() {
		if out, err := meshEchoClient(t, e.ext, dst, 1000, 1, "-timeout", "5s"); err != nil {
			t.Fatalf("control: %s not reachable before the rules: %v\n%s", dst, err, out)
		}
	}

	e.bFerry = meshSidecar(t, e.back, backID)
	e.clientFerry = meshSidecar(t, e.client, clientID, "-log-level", "debug")
	return e
}

// backApp6 are the app's port at back6's global and link-local addresses.
func (e *v6Env) backApp6() []string {
	return []string{
		net.JoinHostPort(e.back.IP6.String(), v6AppPort),
		net.JoinHostPort(e.backLL.String()+"%eth0", v6AppPort),
	}
}

func (e *v6Env) echo(t *testing.T, addr string, bytes, conns int) {
	t.Helper()
	out, err := meshEchoClient(t, e.client, addr, bytes, conns, "-timeout", "20s")
	if err != nil || !strings.HasPrefix(out, "ok ") {
		t.Fatalf("echo client -> %s: %v\n%s\nclient ferry:\n%s", addr, err, out, rtTail(e.clientFerry.Output(), 30))
	}
}

func TestIPv6DualStack(t *testing.T) {
	e := v6Setup(t)
	const (
		outOK    = `ferry_connections_total{direction="outbound",outcome="ok"}`
		inOK     = `ferry_connections_total{direction="inbound",outcome="ok"}`
		rejected = `ferry_connections_total{direction="outbound",outcome="rejected"}`
	)
	ext6 := net.JoinHostPort(e.ext.IP6.String(), v6ExtPort)

	t.Run("the rules of both families are installed", func(t *testing.T) {
		for _, p := range []*testbed.Pod{e.client, e.back} {
			v6 := natTable(t, p, "ip6tables-save")
			for _, want := range []string{"-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
				"-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000", "-d ::1/128 -j RETURN"} {
				if !strings.Contains(v6, want) {
					t.Fatalf("%s: IPv6 nat table lacks %q:\n%s", p.Name, want, v6)
				}
			}
		}
	})

	t.Run("outbound IPv6 to a non-mesh host passes through ferry, half-close included", func(t *testing.T) {
		before := meshMetric(t, e.client, outOK)
		e.echo(t, ext6, 256<<10, 3) // the echo client half-closes and checks every byte
		if n := meshMetric(t, e.client, outOK); n < before+3 {
			t.Fatalf("outbound ok %d -> %d: the IPv6 connections did not go through ferry", before, n)
		}
		// IPv4 still works beside it.
		e.echo(t, net.JoinHostPort(e.ext.IP.String(), v6ExtPort), 4096, 1)
	})

	t.Run("outbound to a link-local IPv6 neighbour never bypasses ferry", func(t *testing.T) {
		// The IPv6 REDIRECT rewrites the destination to ::1, but a socket
		// connecting to fe80::…%eth0 is bound to eth0 by the scope id, so
		// the kernel cannot deliver the rewritten SYN to ferry: the
		// connection does not complete (Consul's dual-stack rules do the
		// same; documented in the README). It must not reach the
		// neighbour plainly either.
		acc0 := meshAccepts(e.extApp)
		dst := net.JoinHostPort(e.extLL.String()+"%eth0", v6ExtPort)
		c, err := meshDialIn(e.client, dst, 2*time.Second)
		if err == nil {
			c.Close()
			t.Fatalf("%s connected from a redirected pod", dst)
		}
		t.Logf("dial %s: %v", dst, err)
		if got := meshAccepts(e.extApp); got != acc0 {
			t.Fatalf("the neighbour accepted %d connections past ferry", got-acc0)
		}
	})

	t.Run("DialedDirectly to a mesh instance's IPv6 address goes over mTLS to it", func(t *testing.T) {
		in0 := meshMetric(t, e.back, inOK)
		acc0 := meshAccepts(e.bApp)
		e.echo(t, net.JoinHostPort(e.back.IP6.String(), v6AppPort), 64<<10, 2)
		if n := meshMetric(t, e.back, inOK); n < in0+2 {
			t.Fatalf("back6 sidecar inbound ok %d -> %d: not carried over the mesh", in0, n)
		}
		if got := meshAcceptsAtLeast(t, e.bApp, acc0+2); got < acc0+2 {
			t.Fatalf("app accepts %d -> %d", acc0, got)
		}
	})

	t.Run("the (IPv4) virtual IP of a service with IPv6 instances routes to them", func(t *testing.T) {
		// Consul assigns the VIP per service, whatever the instances'
		// family; ferry dials the instance's IPv6 sidecar address.
		vip := meshVIP(t, e.tb, "backend6")
		in0 := meshMetric(t, e.back, inOK)
		e.echo(t, net.JoinHostPort(vip, v6AppPort), 64<<10, 2)
		if n := meshMetric(t, e.back, inOK); n < in0+2 {
			t.Fatalf("back6 sidecar inbound ok %d -> %d", in0, n)
		}
	})

	t.Run("explicit upstream on ::1", func(t *testing.T) {
		in0 := meshMetric(t, e.back, inOK)
		e.echo(t, v6Upstream, 64<<10, 2)
		if n := meshMetric(t, e.back, inOK); n < in0+2 {
			t.Fatalf("back6 sidecar inbound ok %d -> %d", in0, n)
		}
	})

	t.Run("a plain IPv6 client never reaches the app, global or link-local", func(t *testing.T) {
		acc0 := meshAccepts(e.bApp)
		for _, dst := range e.backApp6() {
			out, err := meshEchoClient(t, e.ext, dst, 1000, 1, "-timeout", "5s")
			if err == nil {
				t.Fatalf("a plain client reached %s past the sidecar:\n%s", dst, out)
			}
		}
		// The sidecar's own port refuses plain TCP over IPv6 as well.
		if out, err := meshEchoClient(t, e.ext, net.JoinHostPort(e.back.IP6.String(), "20000"), 1000, 1, "-timeout", "5s"); err == nil {
			t.Fatalf("plain TCP through the inbound listener over IPv6:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond) // an accept would have been printed by now
		if got := meshAccepts(e.bApp); got != acc0 {
			t.Fatalf("the app accepted %d connections from a plain client", got-acc0)
		}
	})

	t.Run("MeshDestinationsOnly refuses IPv6 passthrough; mesh traffic unaffected", func(t *testing.T) {
		c := e.tb.Consul.Client
		setMeshOnly := func(on bool) {
			if _, _, err := c.ConfigEntries().Set(&api.MeshConfigEntry{
				TransparentProxy: api.TransparentProxyMeshConfig{MeshDestinationsOnly: on}}, nil); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { c.ConfigEntries().Delete(api.MeshConfig, api.MeshConfigMesh, nil) })
		r0 := meshMetric(t, e.client, rejected)
		setMeshOnly(true)
		meshPoll(t, "IPv6 passthrough refused", 10*time.Second, func() bool {
			_, err := meshEchoClient(t, e.client, ext6, 1024, 1, "-timeout", "5s")
			return err != nil
		})
		if r1 := meshMetric(t, e.client, rejected); r1 <= r0 {
			t.Fatalf("rejected metric %d -> %d", r0, r1)
		}
		e.echo(t, net.JoinHostPort(e.back.IP6.String(), v6AppPort), 4096, 1)
		e.echo(t, v6Upstream, 4096, 1)
		setMeshOnly(false)
		meshPoll(t, "IPv6 passthrough back", 10*time.Second, func() bool {
			_, err := meshEchoClient(t, e.client, ext6, 1024, 1, "-timeout", "5s")
			return err == nil
		})
	})
}
