package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// The client's side of a GOAWAY: what it wrote before the server's first
// frame is replayed on the new session when it fits replayMax; a tunnel
// the server took (a frame came first), or one whose copy outgrew the
// bound, is never replayed and ends with a reset.
func TestGoAwayReplay(t *testing.T) {
	for _, tc := range []struct {
		name      string
		send      int  // bytes the app writes before the GOAWAY
		dataFirst bool // the server's DATA frame comes before the GOAWAY
		replayed  bool
	}{
		{"small request", 5, false, true},
		{"request at the bound", replayMax, false, true},
		{"nothing written yet", 0, false, true},
		{"copy outgrew the bound", replayMax + 1, false, false},
		{"tunnel already taken", 5, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			cs, ss := sessionPair(t)
			cs2, ss2 := sessionPair(t)
			var redials atomic.Int32
			redial := func() (net.Conn, error) {
				redials.Add(1)
				nt := NewConn(cs2, func(bool) { cs2.Close() })
				if err := WriteOpen(nt); err != nil {
					return nil, err
				}
				return nt, nil
			}
			ct := NewClientConn(cs, func(bool) { cs.Close() }, redial)
			if err := WriteOpen(ct); err != nil {
				t.Fatal(err)
			}
			msg := bytes.Repeat([]byte("x"), tc.send)
			if _, err := ct.Write(msg); err != nil {
				t.Fatalf("write: %v", err)
			}
			if err := ct.CloseWrite(); err != nil {
				t.Fatalf("close write: %v", err)
			}
			// The old session's server: it never takes the tunnel.
			go func() {
				if tc.dataFirst {
					ss.Write([]byte{frameData, 0, 0, 1, 'd'})
				}
				GoAway(ss, GoAwayLinger)
			}()
			// The new session's server: an echo of one tunnel.
			srvErr := make(chan error, 1)
			go func() {
				defer ss2.Close()
				if err := ReadOpen(ss2); err != nil {
					srvErr <- err
					return
				}
				st := NewConn(ss2, func(bool) {})
				got, err := io.ReadAll(st)
				if err == nil {
					_, err = st.Write(got)
				}
				if err == nil {
					err = st.CloseWrite()
				}
				srvErr <- err
			}()

			ct.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(ct)
			ct.Close()
			if tc.replayed {
				if err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("replayed tunnel: %d bytes back, %v; want the %d sent", len(got), err, len(msg))
				}
				if err := <-srvErr; err != nil {
					t.Fatalf("new session's server: %v", err)
				}
			} else {
				if err == nil {
					t.Fatalf("tunnel ended cleanly with %d bytes; want an error", len(got))
				}
				if !tc.dataFirst && !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("error %v; want a reset", err)
				}
				cs2.Close()
			}
			if want := int32(0); tc.replayed {
				want = 1
				if redials.Load() != want {
					t.Fatalf("redials %d, want %d", redials.Load(), want)
				}
			} else if redials.Load() != 0 {
				t.Fatalf("redialed %d times; want no replay", redials.Load())
			}
		})
	}
}

// BenchmarkTunnelRequest is one request/response tunnel (1 KiB each way)
// over a reused session, with the client's GOAWAY copy (replayable) and
// without it (plain): the copy's cost per connection.
func BenchmarkTunnelRequest(b *testing.B) {
	for _, bc := range []struct {
		name   string
		redial func() (net.Conn, error)
	}{
		{"plain", nil},
		{"replayable", func() (net.Conn, error) { return nil, errors.New("not in a benchmark") }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			cs, ss := sessionPair(b)
			req := bytes.Repeat([]byte("q"), 1024)
			go func() {
				buf := make([]byte, 2048)
				for ReadOpen(ss) == nil {
					st := NewConn(ss, func(bool) {})
					n, _ := io.ReadFull(st, buf[:len(req)])
					st.Write(buf[:n])
					st.CloseWrite()
					io.Copy(io.Discard, st)
				}
			}()
			buf := make([]byte, 2048)
			b.ReportAllocs()
			b.SetBytes(2 * int64(len(req)))
			for b.Loop() {
				ct := NewClientConn(cs, func(bool) {}, bc.redial)
				if err := WriteOpen(ct); err != nil {
					b.Fatal(err)
				}
				ct.Write(req)
				ct.CloseWrite()
				if _, err := io.ReadFull(ct, buf[:len(req)]); err != nil {
					b.Fatal(err)
				}
				if _, err := ct.Read(buf); err != io.EOF {
					b.Fatalf("end: %v", err)
				}
				ct.Close()
			}
		})
	}
}

// Once the server's first frame shows it took the tunnel, the copy goes:
// a connection that sent its request and then only reads does not hold it.
func TestGoAwayCopyDroppedOnAccept(t *testing.T) {
	cs, ss := sessionPair(t)
	ct := NewClientConn(cs, func(bool) {}, func() (net.Conn, error) { return nil, errors.New("unused") })
	if err := WriteOpen(ct); err != nil {
		t.Fatal(err)
	}
	ct.Write([]byte("request"))
	ct.wmu.Lock()
	kept := len(ct.kept)
	ct.wmu.Unlock()
	if kept != len("request") {
		t.Fatalf("kept %d bytes before the answer, want %d", kept, len("request"))
	}
	go ss.Write([]byte{frameData, 0, 0, 2, 'o', 'k'})
	buf := make([]byte, 2)
	if _, err := io.ReadFull(ct, buf); err != nil {
		t.Fatal(err)
	}
	ct.wmu.Lock()
	defer ct.wmu.Unlock()
	if ct.kept != nil || ct.copyOK {
		t.Fatalf("copy kept after the server's first frame: %d bytes, copyOK %v", len(ct.kept), ct.copyOK)
	}
}

// The same replay when the tunnel is over a kernel TLS session and the
// app's bytes come in by splice (SpliceFrom): until the server's first
// frame, chunks are read out of the pipe into the replay's copy, so a
// GOAWAY still replays them on the new session; past the bound there is
// no replay, as with copies.
func TestGoAwayReplaySpliced(t *testing.T) {
	for _, tc := range []struct {
		name     string
		send     int
		replayed bool
	}{
		{"small request", 5, true},
		{"request at the bound", replayMax, true},
		{"copy outgrew the bound", replayMax + 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			a, b := testkit.TCPPair(t)
			a2, b2 := testkit.TCPPair(t)
			cs, ss := kernelLeg{newKernelSession(a)}, kernelLeg{newKernelSession(b)}
			cs2, ss2 := kernelLeg{newKernelSession(a2)}, kernelLeg{newKernelSession(b2)}
			redial := func() (net.Conn, error) {
				nt := NewConn(cs2, func(bool) { cs2.Close() })
				if err := WriteOpen(nt); err != nil {
					return nil, err
				}
				return nt, nil
			}
			ct := NewClientConn(cs, func(bool) { cs.Close() }, redial)
			if err := WriteOpen(ct); err != nil {
				t.Fatal(err)
			}
			// The app's bytes, spliced in.
			app, in := testkit.TCPPair(t)
			msg := bytes.Repeat([]byte("y"), tc.send)
			go func() {
				app.Write(msg)
				app.CloseWrite()
			}()
			if _, err := ct.SpliceFrom(in); err != nil {
				t.Fatalf("splice from the app: %v", err)
			}
			if err := ct.CloseWrite(); err != nil {
				t.Fatalf("close write: %v", err)
			}
			go GoAway(ss, GoAwayLinger)
			srvErr := make(chan error, 1)
			go func() {
				defer ss2.Close()
				if err := ReadOpen(ss2); err != nil {
					srvErr <- err
					return
				}
				st := NewConn(ss2, func(bool) {})
				got, err := io.ReadAll(st)
				if err == nil {
					_, err = st.Write(got)
				}
				if err == nil {
					err = st.CloseWrite()
				}
				srvErr <- err
			}()
			// The answer, spliced out to the app.
			out, app2 := testkit.TCPPair(t)
			done := make(chan error, 1)
			go func() {
				_, err := ct.SpliceTo(out)
				out.CloseWrite()
				done <- err
			}()
			app2.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, _ := io.ReadAll(app2)
			err := <-done
			ct.Close()
			if tc.replayed {
				if err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("replayed tunnel: %d bytes back, %v; want the %d sent", len(got), err, len(msg))
				}
				if err := <-srvErr; err != nil {
					t.Fatalf("new session's server: %v", err)
				}
			} else {
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("error %v; want a reset", err)
				}
				cs2.Close()
			}
		})
	}
}
