package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/pump"
)

// Several app connections, one after another, over one session: each
// through a Pump on both sides (client app → Pump → tunnel → Pump → echo
// app), byte-exact, half-closed both ways, and each leaves the session
// clean for the next.
func TestTunnelsOverOneSession(t *testing.T) {
	t.Run("user-space TLS", func(t *testing.T) {
		testkit.CheckLeaks(t)
		cs, ss := sessionPair(t)
		tunnelsOverOneSession(t, cs, ss)
	})
	// The same over a kernel TLS session (a stand-in over plain TCP: this
	// kernel has none; the proxy's UML suite runs the real one): the
	// pump never splices the session's socket as if it were the stream,
	// and the tunnel splices the payloads itself: only headers, EOFs and
	// OPENs pass through ferry.
	t.Run("kernel TLS", func(t *testing.T) {
		testkit.CheckLeaks(t)
		a, b := testkit.TCPPair(t)
		cs, ss := newKernelSession(a), newKernelSession(b)
		tunnelsOverOneSession(t, kernelLeg{cs}, kernelLeg{ss})
		if c, s := cs.copied.Load(), ss.copied.Load(); c+s > 64<<10 {
			t.Errorf("%d bytes (client) and %d (server) through the session's Read and Write; want payloads spliced", c, s)
		}
	})
}

func tunnelsOverOneSession(t *testing.T, cs, ss Session) {
	var _ pump.KernelTLS = kernelLeg{} // the stand-in is what the pump would splice
	app := testkit.EchoServer(t)
	relC, relS := make(chan bool, 1), make(chan bool, 1)
	for i, n := range []int64{0, 1, 5 << 20, 1000} {
		ct := NewConn(cs, func(clean bool) { relC <- clean })
		if err := WriteOpen(ct); err != nil {
			t.Fatalf("tunnel %d: open: %v", i, err)
		}
		if err := ReadOpen(ss); err != nil {
			t.Fatalf("tunnel %d: server read OPEN: %v", i, err)
		}
		st := NewConn(ss, func(clean bool) { relS <- clean })

		// Server side: tunnel → echo app.
		up, err := net.Dial("tcp", app)
		if err != nil {
			t.Fatal(err)
		}
		srvDone := make(chan pump.Stats, 1)
		go func() { srvDone <- pump.Pump(context.Background(), st, up, time.Minute) }()
		// Client side: app conn → tunnel.
		appClient, a := testkit.TCPPair(t)
		cliDone := make(chan pump.Stats, 1)
		go func() { cliDone <- pump.Pump(context.Background(), a, ct, time.Minute) }()

		go func() {
			io.Copy(appClient, &testkit.PatternReader{N: n, Seed: byte(i)})
			appClient.CloseWrite()
		}()
		h := sha256.New()
		appClient.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.Copy(h, appClient)
		if err != nil || got != n {
			t.Fatalf("tunnel %d: echoed %d bytes, %v; want %d", i, got, err, n)
		}
		if want := testkit.PatternSum(n, byte(i)); !bytes.Equal(h.Sum(nil), want[:]) {
			t.Fatalf("tunnel %d: checksum mismatch", i)
		}
		appClient.Close()
		for _, ch := range []chan pump.Stats{cliDone, srvDone} {
			select {
			case st := <-ch:
				if st.Err != nil || st.Sent != n || st.Received != n {
					t.Fatalf("tunnel %d: pump %+v, want %d both ways and no error", i, st, n)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("tunnel %d: pump did not finish", i)
			}
		}
		if c, s := <-relC, <-relS; !c || !s {
			t.Fatalf("tunnel %d: released clean client=%v server=%v, want both", i, c, s)
		}
	}
}

// A session that ends inside a tunnel (no EOF frame) is an error, never a
// clean end of the stream, and the session is not handed back as clean.
func TestTunnelBrokenSession(t *testing.T) {
	testkit.CheckLeaks(t)
	cs, ss := sessionPair(t)
	rel := make(chan bool, 1)
	ct := NewConn(cs, func(clean bool) { rel <- clean })
	st := NewConn(ss, func(bool) {})
	go func() {
		st.Write([]byte("partial"))
		ss.Close() // close_notify, FIN: but no EOF frame
	}()
	buf := make([]byte, 64)
	n, err := io.ReadFull(ct, buf[:7])
	if err != nil || string(buf[:n]) != "partial" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	if _, err := ct.Read(buf); !errors.Is(err, errTunnelBroken) {
		t.Fatalf("read after the session ended: %v, want errTunnelBroken", err)
	}
	ct.Close()
	if <-rel {
		t.Fatal("broken tunnel released as clean")
	}
}

func TestTunnelBadFrames(t *testing.T) {
	for _, tc := range []struct {
		name string
		wire []byte
	}{
		{"unknown type", []byte{7, 0, 0, 0}},
		{"EOF with a length", []byte{frameEOF, 0, 0, 3, 'a', 'b', 'c'}},
		{"OPEN inside a tunnel", []byte{frameOpen, 0, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs, ss := sessionPair(t)
			ct := NewConn(cs, func(bool) {})
			go ss.Write(tc.wire)
			cs.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := ct.Read(make([]byte, 16)); err == nil || errors.Is(err, io.EOF) {
				t.Fatalf("read: %v, want a protocol error", err)
			}
			if ct.clean() {
				t.Fatal("tunnel clean after a protocol error")
			}
		})
	}
}

func TestReadOpen(t *testing.T) {
	cs, ss := sessionPair(t)
	go func() {
		cs.Write([]byte{frameOpen, 0, 0, 0})
		cs.Write([]byte{frameData, 0, 0, 0})
	}()
	if err := ReadOpen(ss); err != nil {
		t.Fatalf("OPEN: %v", err)
	}
	if err := ReadOpen(ss); err == nil {
		t.Fatal("DATA taken for OPEN")
	}
	cs2, ss2 := sessionPair(t)
	cs2.Close()
	if err := ReadOpen(ss2); !errors.Is(err, io.EOF) {
		t.Fatalf("idle session closed by the client: %v, want io.EOF", err)
	}
}

func TestTunnelPool(t *testing.T) {
	now := time.Unix(1000, 0)
	gen := uint64(1)
	newPool := func() *Pool {
		p := NewPool(func() uint64 { return gen })
		p.now = func() time.Time { return now }
		return p
	}
	t.Run("reuses a quiet session", func(t *testing.T) {
		p := newPool()
		cs, _ := sessionPair(t)
		p.Put("a", cs, now, gen)
		if got, _, _ := p.Get("b"); got != nil {
			t.Fatal("session handed out for another address")
		}
		if got, _, _ := p.Get("a"); got != cs {
			t.Fatal("pooled session not reused")
		}
		if got, _, _ := p.Get("a"); got != nil {
			t.Fatal("one session handed out twice")
		}
	})
	t.Run("retires idle, old, other-generation and closed sessions", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			prep func(p *Pool, cs, ss *tls.Conn)
		}{
			{"idle", func(p *Pool, cs, _ *tls.Conn) {
				p.Put("a", cs, now, gen)
				now = now.Add(tunnelIdle)
			}},
			{"old", func(p *Pool, cs, _ *tls.Conn) {
				p.Put("a", cs, now.Add(-tunnelMaxAge+time.Second), gen)
				now = now.Add(time.Second)
			}},
			{"generation", func(p *Pool, cs, _ *tls.Conn) {
				p.Put("a", cs, now, gen)
				gen++
			}},
			{"peer closed", func(p *Pool, cs, ss *tls.Conn) {
				p.Put("a", cs, now, gen)
				ss.Close()
				// Until its close_notify and FIN are on the client's socket.
				for i := 0; i < 500 && quiet(cs); i++ {
					time.Sleep(10 * time.Millisecond)
				}
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				p := newPool()
				cs, ss := sessionPair(t)
				tc.prep(p, cs, ss)
				if got, _, _ := p.Get("a"); got != nil {
					t.Fatal("stale session reused")
				}
			})
		}
	})
	t.Run("closes sessions left idle", func(t *testing.T) {
		p := newPool()
		cs, ss := sessionPair(t)
		p.Put("a", cs, now, gen)
		now = now.Add(tunnelIdle)
		p.expire()
		if len(p.conns) != 0 || p.sweep != nil {
			t.Fatalf("after expiry: %d addresses pooled, sweep pending %v", len(p.conns), p.sweep != nil)
		}
		// The session was closed: the server sees its close_notify.
		ss.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := ss.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("server read after the client expired the session: %v, want EOF", err)
		}
	})
	t.Run("CloseAll stops the sweep and refuses more", func(t *testing.T) {
		p := newPool()
		cs, _ := sessionPair(t)
		p.Put("a", cs, now, gen)
		p.CloseAll()
		cs2, _ := sessionPair(t)
		p.Put("a", cs2, now, gen)
		if got, _, _ := p.Get("a"); got != nil || p.sweep != nil {
			t.Fatal("pool kept a session after CloseAll")
		}
	})
	t.Run("keeps at most maxIdle per address", func(t *testing.T) {
		p := newPool()
		p.maxIdle = 2
		var sessions []*tls.Conn
		for range 3 {
			cs, _ := sessionPair(t)
			sessions = append(sessions, cs)
			p.Put("a", cs, now, gen)
		}
		n := 0
		for {
			got, _, _ := p.Get("a")
			if got == nil {
				break
			}
			n++
		}
		if n != 2 {
			t.Fatalf("%d sessions pooled, want 2", n)
		}
	})
}

// FuzzTunnelFrames feeds arbitrary bytes to the frame reader: it must never
// panic, must hand out exactly the DATA payloads a straightforward parse of
// the same bytes finds, and may report a clean end (io.EOF) only after a
// well-formed EOF frame.
func FuzzTunnelFrames(f *testing.F) {
	f.Add([]byte{frameData, 0, 0, 3, 'a', 'b', 'c', frameEOF, 0, 0, 0})
	f.Add([]byte{frameData, 0, 0, 0, frameEOF, 0, 0, 0})
	f.Add([]byte{frameData, 0, 0, 5, 'a'})
	f.Add([]byte{frameEOF, 0, 0, 1, 'x'})
	f.Add([]byte{frameOpen, 0, 0, 0})
	f.Add([]byte{frameData, 0xff, 0xff, 0xff})
	f.Add([]byte{})
	f.Add([]byte{frameGoAway, 0, 0, 0})
	f.Add([]byte{frameData, 0, 0, 1, 'a', frameGoAway, 0, 0, 0})
	f.Fuzz(func(t *testing.T, wire []byte) {
		// The oracle.
		var want []byte
		clean := false
		for rest := wire; len(rest) >= frameHeader; {
			typ, n := rest[0], int(rest[1])<<16|int(rest[2])<<8|int(rest[3])
			rest = rest[frameHeader:]
			if typ == frameEOF && n == 0 {
				clean = true
				break
			}
			if typ != frameData {
				break
			}
			take := min(n, len(rest))
			want = append(want, rest[:take]...)
			if take < n {
				break
			}
			rest = rest[n:]
		}

		tc := &Conn{r: bytes.NewReader(wire), release: func(bool) {}}
		var got []byte
		buf := make([]byte, 7) // small reads: frames span several
		var err error
		for range len(wire) + 2 {
			var n int
			n, err = tc.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				break
			}
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %q, want %q", got, want)
		}
		if (err == io.EOF) != clean {
			t.Fatalf("end %v, clean EOF frame present: %v", err, clean)
		}
		if err == nil {
			t.Fatal("reader did not end")
		}
	})
}
