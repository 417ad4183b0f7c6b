package proxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/tunnel"
)

// A pooled session that the server ends (here: too old; a drain or a peer
// that no longer verifies does the same) while the client is already
// reusing it for its next connection: the server's GOAWAY turns the OPEN
// away, the client replays the connection on a fresh session, and the app
// sees its bytes echoed and nothing else (audit F14). Before, the
// connection failed after its connect had succeeded.
func TestTunnelGoAwayReplays(t *testing.T) { tunnelGoAwayReplays(t, KTLS{}) }

// The same between sidecars that agree on kernel TLS tunnel sessions
// (KTLSTunnelALPN): the GOAWAY, the server's close_notify and its drain of
// the crossing OPEN go through the kernel session (under UML), and the
// replay gets a fresh kernel session.
func TestKTLSTunnelGoAwayReplays(t *testing.T) { tunnelGoAwayReplays(t, KTLS{Use: true}) }

func tunnelGoAwayReplays(t *testing.T, k KTLS) {
	testkit.CheckLeaks(t)
	ca := mtlstest.NewCA(t)
	modes := NewTLSModeMetric()
	acc := &MeshAcceptor{Identity: ca.Identity(t, "db", mtlstest.EC256), Intentions: allowAll(t), Service: "db",
		KTLS: k, TLSModes: modes}
	acc.Init()
	acc.maxAge = time.Nanosecond // every session ends after its first tunnel
	// The server decides only once the client's next OPEN is on its way:
	// the race, made certain.
	opened := make(chan struct{})
	acc.testHookNext = func() { <-opened }
	p := startProxy(t, Config{Acceptor: acc}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	r := NewMeshRouter(nil, ca.Identity(t, "web", mtlstest.EC256), nil)
	r.SetKTLS(k)
	t.Cleanup(r.Close)
	route := r.Upstream(catalog.Service{Name: "db", Datacenter: ca.Datacenter}, true, netip.MustParseAddrPort(in.String()))

	dial := func() net.Conn {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := route.Dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	finish := func(c net.Conn, msg string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != msg {
			t.Fatalf("echo %q, %v; want %q", got, err, msg)
		}
		c.Close()
	}

	c := dial()
	c.Write([]byte("one"))
	c.(*tunnel.Conn).CloseWrite()
	finish(c, "one")

	c = dial() // the pooled session: the server has not ended it yet
	if got := r.tunnels.With("reused").Value(); got != 1 {
		t.Fatalf("reused sessions %d, want 1", got)
	}
	if !k.Use {
		c.Write([]byte("two"))
		c.(*tunnel.Conn).CloseWrite()
		close(opened)
		finish(c, "two")
	} else {
		// Pumped from an app, as in the sidecar: on a kernel session the
		// tunnel splices, and the replay copy must still hold "two".
		app, a := testkit.TCPPair(t)
		run := startPump(t, context.Background(), a, c, time.Minute)
		app.Write([]byte("two"))
		app.CloseWrite()
		close(opened)
		got, err := testkit.ReadAllTimeout(t, app, 10*time.Second)
		if err != nil || string(got) != "two" {
			t.Fatalf("echo %q, %v; want %q", got, err, "two")
		}
		if st := run.Wait(t, 10*time.Second); st.Err != nil || st.Sent != 3 || st.Received != 3 {
			t.Errorf("client sidecar pump: %+v", st)
		}
	}
	if got := r.tunnels.With("replayed").Value(); got != 1 {
		t.Fatalf("replayed connections %d, want 1", got)
	}
	testkit.Eventually(t, "both connections ok at the server", func() bool { return counter(p, "inbound", "ok") == 2 })
	want := tlsModeUser
	if k.Use {
		want = agreedMode(t)
	}
	if in, out := modes.With("inbound", want).Value(), r.TLSModeMetric().With("outbound", want).Value(); in != 2 || out != 2 {
		t.Errorf("%s sessions: inbound %d, outbound %d; want 2 and 2 (the first and the replay's)", want, in, out)
	}
	t.Logf("replayed after GOAWAY; sessions counted %s on both sidecars", want)
}
