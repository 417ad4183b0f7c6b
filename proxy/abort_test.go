package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
)

// trackedLike stands for a pass-through wrapper with NetConn() and
// CloseWrite (the catalog's tracked upstream conns): one more level for
// tcpOf and the abort path to see through.
type trackedLike struct{ net.Conn }

func (c trackedLike) NetConn() net.Conn { return c.Conn }
func (c trackedLike) CloseWrite() error {
	return c.Conn.(interface{ CloseWrite() error }).CloseWrite()
}

// meshChain builds clientApp ⇄ Pump ⇄ mTLS (or a tunnel over it) ⇄ Pump ⇄
// serverApp, the way two ferry sidecars carry an app connection.
func meshChain(t *testing.T, tunneled, wrap bool) (clientApp, serverApp *net.TCPConn, out, in *pumpRun) {
	t.Helper()
	cs, ss := sessionPair(t)
	var up, down net.Conn = cs, ss
	if tunneled {
		ct := tunnel.NewConn(cs, func(clean bool) {
			if !clean {
				cs.Close()
			}
		})
		if err := tunnel.WriteOpen(ct); err != nil {
			t.Fatal(err)
		}
		if err := tunnel.ReadOpen(ss); err != nil {
			t.Fatal(err)
		}
		up = ct
		down = tunnel.NewConn(ss, func(clean bool) {
			if !clean {
				ss.Close()
			}
		})
	}
	if wrap {
		up = trackedLike{up}
	}
	clientApp, a := testkit.TCPPair(t)
	b, serverApp := testkit.TCPPair(t)
	out = startPump(t, context.Background(), a, up, time.Minute)
	in = startPump(t, context.Background(), down, b, time.Minute)
	return clientApp, serverApp, out, in
}

// readUntilErr reads c until an error and returns it (io.EOF for a clean
// end), failing the test when nothing ends the stream within d.
func readUntilErr(t *testing.T, c net.Conn, d time.Duration) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no end of stream within %v", d)
			}
			return err
		}
	}
}

// An app's reset crosses the mTLS hop as a reset, both ways, over plain
// mTLS and over tunnels (with and without a wrapper between the pump and
// the tunnel): the other app must never read the truncated stream as
// complete (audit F4).
func TestAbortCrossesMeshHop(t *testing.T) {
	for _, tc := range []struct {
		name            string
		tunnel, wrap    bool
		serverAppAborts bool
	}{
		{"mtls client app resets", false, false, false},
		{"mtls server app resets", false, false, true},
		{"tunnel client app resets", true, false, false},
		{"tunnel server app resets", true, false, true},
		{"tracked tunnel client app resets", true, true, false},
		{"tracked tunnel server app resets", true, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			clientApp, serverApp, out, in := meshChain(t, tc.tunnel, tc.wrap)
			aborter, other := clientApp, serverApp
			if tc.serverAppAborts {
				aborter, other = serverApp, clientApp
			}
			msg := []byte("partial upload")
			if _, err := aborter.Write(msg); err != nil {
				t.Fatal(err)
			}
			other.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(other, make([]byte, len(msg))); err != nil {
				t.Fatalf("data before the reset: %v", err)
			}
			aborter.SetLinger(0)
			aborter.Close()
			if err := readUntilErr(t, other, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("other app read %v after the reset; want ECONNRESET", err)
			}
			for _, r := range []*pumpRun{out, in} {
				if st := r.Wait(t, 5*time.Second); st.Err == nil {
					t.Errorf("pump ended without an error: %+v", st)
				}
			}
		})
	}
}

// A clean end still crosses as a clean end over the same chains: the
// abort path must not take over half-close.
func TestCleanEndCrossesMeshHop(t *testing.T) {
	for _, tunnel := range []bool{false, true} {
		testkit.CheckLeaks(t)
		clientApp, serverApp, out, in := meshChain(t, tunnel, true)
		testkit.ExchangeBothWays(t, clientApp, serverApp, 1<<20)
		for _, r := range []*pumpRun{out, in} {
			if st := r.Wait(t, 5*time.Second); st.Err != nil {
				t.Errorf("tunnel=%v: pump error %v on a clean end", tunnel, st.Err)
			}
		}
	}
}

// A TLS peer whose stream stops inside a record (FIN after part of it) has
// lost bytes: the app gets a reset and the pump an error, never a clean
// end (audit F9). So does a FIN without close_notify at a record boundary
// (a killed peer sidecar): a peer ending its stream on purpose sends
// close_notify first.
func TestTruncatedTLSStreamIsAnError(t *testing.T) {
	for _, tc := range []struct {
		name    string
		partial bool // cut inside a record, else at a record boundary
	}{
		{"record cut by FIN", true},
		{"FIN without close_notify", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			cs, ss := sessionPair(t)
			app, b := testkit.TCPPair(t)
			run := startPump(t, context.Background(), ss, b, time.Minute)
			if _, err := cs.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			raw := cs.NetConn().(*pump.BatchConn).TCPConn
			if tc.partial {
				// The header of a record promising 100 bytes, and 3 of them.
				raw.Write([]byte{23, 3, 3, 0, 100, 1, 2, 3})
			}
			raw.CloseWrite()
			app.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(app, make([]byte, 5)); err != nil {
				t.Fatalf("data before the cut: %v", err)
			}
			if err := readUntilErr(t, app, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("app read %v after the cut; want ECONNRESET", err)
			}
			if st := run.Wait(t, 5*time.Second); !errors.Is(st.Err, io.ErrUnexpectedEOF) {
				t.Fatalf("pump err %v; want one wrapping io.ErrUnexpectedEOF", st.Err)
			}
		})
	}
}

// close_notify then FIN is the clean end, over batchConn too.
func TestCloseNotifyIsCleanEnd(t *testing.T) {
	testkit.CheckLeaks(t)
	cs, ss := sessionPair(t)
	app, b := testkit.TCPPair(t)
	run := startPump(t, context.Background(), ss, b, time.Minute)
	cs.Write([]byte("hello"))
	cs.CloseWrite()
	cs.NetConn().(*pump.BatchConn).CloseWrite()
	got, err := testkit.ReadAllTimeout(t, app, 5*time.Second)
	if err != nil || string(got) != "hello" {
		t.Fatalf("app read %q, %v; want hello and EOF", got, err)
	}
	app.CloseWrite()
	if st := run.Wait(t, 5*time.Second); st.Err != nil {
		t.Fatalf("pump err %v", st.Err)
	}
}

// tcpOf finds the socket however deep the wrappers go (audit F16: a fixed
// depth of 4 missed tracked(tunnel(tls(batch(tcp))))).
func TestTCPOfUnwrapsAll(t *testing.T) {
	cs, _ := sessionPair(t)
	var c net.Conn = trackedLike{trackedLike{tunnel.NewConn(cs, func(bool) {})}}
	if pump.TCPOf(c) == nil {
		t.Fatal("tcpOf found no TCP conn under tracked(tracked(tunnel(tls(batch(tcp)))))")
	}
}

// Connections that never send a byte hold no copy buffers (audit F10):
// measured as heap retained per silent TLS⇄TCP pump. With a buffer per
// direction it was ~138 KiB; without, a few KiB of TLS and socket state.
// Run without -race (make unit's Allocs pass), whose instrumentation
// inflates every heap figure.
func TestSilentConnectionsHoldNoBuffersAllocs(t *testing.T) {
	if testkit.RaceEnabled {
		t.Skip("heap figures are not meaningful under -race")
	}
	const n = 64
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range n {
		_, ss := sessionPair(t)
		_, b := testkit.TCPPair(t)
		startPump(t, context.Background(), ss, b, time.Minute)
	}
	time.Sleep(200 * time.Millisecond) // let every half reach its wait
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	t.Logf("heap per silent connection: %d KiB", per>>10)
	if per > 48<<10 {
		t.Fatalf("%d KiB of heap per silent connection; want no copy buffers (< 48 KiB)", per>>10)
	}
}
