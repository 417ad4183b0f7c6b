package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
)

// The inbound side answers the tunnel protocol only to clients that offer
// it: a Go peer offering other protocols (Consul's connect-native SDK
// offers h2) must still connect (audit F5).
func TestInboundALPNOnlyForFerryPeers(t *testing.T) {
	ca := mtlstest.NewCA(t)
	a := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256)}
	a.Init()
	srv := mtlstest.StartServer(t, a.cfg)
	client := ca.Identity(t, "web", mtlstest.EC256)
	for _, tc := range []struct {
		name   string
		offer  []string
		expect string
	}{
		{"connect-native h2", []string{"h2"}, ""},
		{"h2 and http/1.1", []string{"h2", "http/1.1"}, ""},
		{"no ALPN", nil, ""},
		{"ferry peer", []string{tunnel.ALPN}, tunnel.ALPN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := client.ClientConfig(ca.ID("api"))
			cfg.NextProtos = tc.offer
			cs, err, sr := srv.Dial(t, cfg)
			mtlstest.MustOK(t, err, sr)
			if cs.NegotiatedProtocol != tc.expect {
				t.Fatalf("negotiated %q, want %q", cs.NegotiatedProtocol, tc.expect)
			}
		})
	}
}

// Outbound, a server that refuses the tunnel protocol (a connect-native Go
// service serving h2 aborts with no_application_protocol) gets the
// connection all the same, without ALPN, and later dials to that instance
// skip the refused offer (audit F5).
func TestDialRetriesWithoutALPN(t *testing.T) {
	ca := mtlstest.NewCA(t)
	scfg := ca.Identity(t, "api", mtlstest.EC256).ServerConfig()
	scfg.NextProtos = []string{"h2"}
	srv := mtlstest.StartServer(t, scfg)
	r := NewMeshRouter(nil, ca.Identity(t, "web", mtlstest.EC256), nil)
	t.Cleanup(r.Close)
	cfg := r.clientConfig(catalog.Service{Name: "api", Datacenter: ca.Datacenter})
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := r.dialTLS(ctx, srv.Addr, cfg, false, nil)
		cancel()
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if tc, ok := c.(*tls.Conn); !ok || tc.ConnectionState().NegotiatedProtocol != "" {
			t.Fatalf("dial %d: got %T, want a plain mTLS session without ALPN", i, c)
		}
		c.Close()
	}
	if !r.alpnRefused.Has(srv.Addr) {
		t.Fatal("the refusing instance was not remembered")
	}
}

// tunnelServer is a ferry-like inbound end for api: it accepts tunnel
// sessions and ends every tunnel at once with its EOF frame.
func tunnelServer(t *testing.T, a *MeshAcceptor) (addr string, opens *atomic.Int64) {
	t.Helper()
	opens = new(atomic.Int64)
	addr = testkit.Serve(t, func(c net.Conn) {
		go func() {
			tc := tls.Server(pump.NewBatchConn(c), a.cfg)
			defer tc.Close()
			_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
			for tunnel.ReadOpen(tc) == nil {
				opens.Add(1)
				st := tunnel.NewConn(tc, func(bool) {})
				st.CloseWrite()
				if _, err := io.Copy(io.Discard, st); err != nil {
					return
				}
			}
		}()
	})
	return addr, opens
}

// A pooled session verified as one service never carries a connection
// meant for another service at the same address (audit F11): the pool is
// keyed by address and expected identity, so the second dial makes a new
// handshake, which fails the identity check.
func TestTunnelPoolKeyedByIdentity(t *testing.T) {
	testkit.CheckLeaks(t)
	ca := mtlstest.NewCA(t)
	a := &MeshAcceptor{Identity: ca.Identity(t, "api", mtlstest.EC256)}
	a.Init()
	addr, opens := tunnelServer(t, a)
	r := NewMeshRouter(nil, ca.Identity(t, "web", mtlstest.EC256), nil)
	t.Cleanup(r.Close)

	dial := func(svc string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return r.dialTLS(ctx, addr, r.clientConfig(catalog.Service{Name: svc, Datacenter: ca.Datacenter}), false, nil)
	}
	c, err := dial("api")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*tunnel.Conn); !ok {
		t.Fatalf("dial api: %T, want a tunnel", c)
	}
	// End the tunnel cleanly so the session goes back to the pool.
	c.(*tunnel.Conn).CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatal(err)
	}
	c.Close()

	if c, err := dial("billing"); err == nil {
		c.Close()
		t.Fatalf("dial billing at api's address succeeded (%d OPENs at the api server): a session verified as api was reused", opens.Load())
	} else if opens.Load() != 1 {
		t.Fatalf("opens %d, err %v", opens.Load(), err)
	}
	// The api session is still pooled for api.
	c, err = dial("api")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if got := r.tunnels.With("reused").Value(); got != 1 {
		t.Fatalf("reused tunnels %d, want 1", got)
	}
}
