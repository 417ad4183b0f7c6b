package pump

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// fakeKernelTLS stands for a *ktls.Conn over a plain socket (this kernel
// has no kTLS; the UML suite runs the real one): the pump must splice its
// socket both ways and read through it only where splice stops, at the
// socket's end, where it says what the end means.
type fakeKernelTLS struct {
	net.Conn
	sock          *net.TCPConn
	end           error // what Read says at the socket's end (io.EOF: close_notify came first)
	reads, writes atomic.Int32
}

func (f *fakeKernelTLS) TCPConn() *net.TCPConn { return f.sock }
func (f *fakeKernelTLS) NetConn() net.Conn     { return f.sock }
func (f *fakeKernelTLS) CloseWrite() error     { return f.sock.CloseWrite() }

func (f *fakeKernelTLS) Read(p []byte) (int, error) {
	f.reads.Add(1)
	n, err := f.sock.Read(p)
	if err == io.EOF {
		err = f.end
	}
	return n, err
}

func (f *fakeKernelTLS) Write(p []byte) (int, error) {
	f.writes.Add(1)
	return f.sock.Write(p)
}

// A KernelTLS leg (behind a pass-through wrapper, as the catalog's tracked
// conns are) is spliced both ways; at the end of its socket's stream its
// Read decides: a clean end (close_notify) half-closes the app, a
// truncation resets it.
func TestPumpSplicesKernelTLSLeg(t *testing.T) {
	const n = 4 << 20
	for _, tc := range []struct {
		name  string
		end   error
		clean bool
	}{
		{"close_notify", io.EOF, true},
		{"FIN without close_notify", io.ErrUnexpectedEOF, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			app, a := testkit.TCPPair(t)
			sock, peer := testkit.TCPPair(t)
			k := &fakeKernelTLS{Conn: sock, sock: sock, end: tc.end}
			run := startPump(t, context.Background(), a, wrapped{k}, time.Minute)

			// app → kTLS leg: spliced into its socket, never through Write.
			go func() {
				io.Copy(app, &testkit.PatternReader{N: n, Seed: 1})
			}()
			peer.SetReadDeadline(time.Now().Add(10 * time.Second))
			testkit.CheckPattern(t, io.LimitReader(peer, n), n, 1)
			if w := k.writes.Load(); w != 0 {
				t.Errorf("%d writes through the leg; want all spliced", w)
			}

			// kTLS leg → app: spliced, then one Read at the socket's end.
			go func() {
				io.Copy(peer, &testkit.PatternReader{N: n, Seed: 2})
				peer.CloseWrite()
			}()
			app.SetReadDeadline(time.Now().Add(10 * time.Second))
			if tc.clean {
				testkit.CheckPattern(t, app, n, 2)
			} else {
				// The reset may overtake data still unread: only its arrival counts.
				if err := readErr(app); !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("app read %v after a truncated stream; want ECONNRESET", err)
				}
			}
			if r := k.reads.Load(); r != 1 {
				t.Errorf("%d reads through the leg; want 1 (at the end of the stream)", r)
			}
			app.Close()
			st := run.Wait(t, 5*time.Second)
			if tc.clean != (st.Err == nil) || !tc.clean && !errors.Is(st.Err, io.ErrUnexpectedEOF) {
				t.Errorf("pump: %+v", st)
			}
		})
	}
}

// wrapped is a pass-through wrapper with NetConn() and CloseWrite.
type wrapped struct{ *fakeKernelTLS }

func (w wrapped) NetConn() net.Conn { return w.fakeKernelTLS }

func readErr(c net.Conn) error {
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			return err
		}
	}
}

// framedOverKernelTLS stands for a tunnel over a kernel TLS session: its
// socket carries frames, so the pump must copy through its Read and Write
// even though a KernelTLS leg is under it.
type framedOverKernelTLS struct {
	*fakeKernelTLS
	reads, writes atomic.Int32
}

func (f *framedOverKernelTLS) NetConn() net.Conn   { return f.fakeKernelTLS }
func (f *framedOverKernelTLS) WaitFrame()          {}
func (f *framedOverKernelTLS) FrameRemaining() int { return 0 }

func (f *framedOverKernelTLS) Read(p []byte) (int, error) {
	f.reads.Add(1)
	return f.fakeKernelTLS.Read(p)
}

func (f *framedOverKernelTLS) Write(p []byte) (int, error) {
	f.writes.Add(1)
	return f.fakeKernelTLS.Write(p)
}

// A tunnel over a kernel TLS session is never spliced as if it were the
// session: that would put the app's bytes on the session unframed.
func TestPumpNeverSplicesUnderAFramedLeg(t *testing.T) {
	testkit.CheckLeaks(t)
	const n = 1 << 20
	app, a := testkit.TCPPair(t)
	sock, peer := testkit.TCPPair(t)
	f := &framedOverKernelTLS{fakeKernelTLS: &fakeKernelTLS{Conn: sock, sock: sock, end: io.EOF}}
	run := startPump(t, context.Background(), a, wrapped2{f}, time.Minute)

	go func() {
		io.Copy(app, &testkit.PatternReader{N: n, Seed: 1})
		app.CloseWrite()
	}()
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	testkit.CheckPattern(t, io.LimitReader(peer, n), n, 1)
	if f.writes.Load() == 0 {
		t.Errorf("no write through the framed leg: the app's bytes were spliced onto its session")
	}
	go func() {
		io.Copy(peer, &testkit.PatternReader{N: n, Seed: 2})
		peer.CloseWrite()
	}()
	app.SetReadDeadline(time.Now().Add(10 * time.Second))
	testkit.CheckPattern(t, app, n, 2)
	if f.reads.Load() < 2 {
		t.Errorf("%d reads through the framed leg: the session was spliced to the app", f.reads.Load())
	}
	app.Close()
	run.Wait(t, 5*time.Second)
}

// wrapped2 is a pass-through wrapper (the catalog's tracked conns) over a
// framed leg.
type wrapped2 struct{ *framedOverKernelTLS }

func (w wrapped2) NetConn() net.Conn { return w.framedOverKernelTLS }
