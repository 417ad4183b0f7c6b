package pump

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"golang.org/x/sys/unix"
)

// Client sends, half-closes, and only then reads the whole reply: the
// pattern Consul's built-in proxy breaks.
func TestPumpHalfCloseClientFirst(t *testing.T) {
	testkit.CheckLeaks(t)
	client, server, run := pumped(t, context.Background(), time.Minute)

	if _, err := client.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := testkit.ReadAllTimeout(t, server, 5*time.Second)
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v; want request, EOF", got, err)
	}
	// The server's reply must still reach the half-closed client.
	if _, err := server.Write([]byte("reply after your EOF")); err != nil {
		t.Fatal(err)
	}
	server.CloseWrite()
	got, err = testkit.ReadAllTimeout(t, client, 5*time.Second)
	if err != nil || string(got) != "reply after your EOF" {
		t.Fatalf("client read %q, %v", got, err)
	}
	st := run.Wait(t, 5*time.Second)
	if st.Err != nil || st.Sent != 7 || st.Received != 20 {
		t.Fatalf("stats %+v; want sent 7, received 20, no error", st)
	}
}

func TestPumpHalfCloseServerFirst(t *testing.T) {
	testkit.CheckLeaks(t)
	client, server, run := pumped(t, context.Background(), time.Minute)

	server.Write([]byte("banner"))
	server.CloseWrite()
	got, err := testkit.ReadAllTimeout(t, client, 5*time.Second)
	if err != nil || string(got) != "banner" {
		t.Fatalf("client read %q, %v", got, err)
	}
	// The client keeps sending after the server's EOF.
	client.Write([]byte("late data"))
	client.CloseWrite()
	got, err = testkit.ReadAllTimeout(t, server, 5*time.Second)
	if err != nil || string(got) != "late data" {
		t.Fatalf("server read %q, %v", got, err)
	}
	if st := run.Wait(t, 5*time.Second); st.Err != nil || st.Sent != 9 || st.Received != 6 {
		t.Fatalf("stats %+v", st)
	}
}

// Both directions at once, large enough to cross many splice calls and
// socket buffer refills, verified by checksum.
func TestPumpLargeBothWays(t *testing.T) {
	testkit.CheckLeaks(t)
	n := int64(64 << 20)
	if testing.Short() {
		n = 8 << 20
	}
	client, server, run := pumped(t, context.Background(), time.Minute)

	testkit.ExchangeBothWays(t, client, server, n)
	if st := run.Wait(t, 10*time.Second); st.Err != nil || st.Sent != n || st.Received != n {
		t.Fatalf("stats %+v; want %d each way", st, n)
	}
}

func TestPumpIdleTimeout(t *testing.T) {
	testkit.CheckLeaks(t)
	client, _, run := pumped(t, context.Background(), 100*time.Millisecond)
	start := time.Now()
	st := run.Wait(t, 5*time.Second)
	if !errors.Is(st.Err, ErrIdle) {
		t.Fatalf("err %v; want ErrIdle", st.Err)
	}
	if el := time.Since(start); el < 100*time.Millisecond {
		t.Fatalf("closed after %v, before the idle timeout", el)
	}
	if _, err := testkit.ReadAllTimeout(t, client, 2*time.Second); !testkit.IsClosedOrReset(err) {
		t.Fatalf("client read after idle close: %v", err)
	}
}

// A trickle of bytes through the splice path (no user-space counters) must
// keep the connection alive: idle is measured from kernel byte counters.
func TestPumpIdleTimeoutNotWhileActive(t *testing.T) {
	testkit.CheckLeaks(t)
	client, server, run := pumped(t, context.Background(), 200*time.Millisecond)
	go io.Copy(io.Discard, server)
	for range 12 { // 12 × 50 ms = 3 idle periods
		if _, err := client.Write([]byte{'x'}); err != nil {
			t.Fatalf("write during trickle: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case <-run.Done():
		t.Fatalf("pump ended during traffic: %v", run.Wait(t, time.Second).Err)
	default:
	}
	// After the trickle stops, the idle timeout applies in the half-closed
	// state too: the server never closes its side.
	client.CloseWrite()
	if st := run.Wait(t, 5*time.Second); !errors.Is(st.Err, ErrIdle) || st.Sent != 12 {
		t.Fatalf("stats %+v; want ErrIdle after 12 bytes", st)
	}
}

func TestPumpEarlyClose(t *testing.T) {
	for _, tc := range []struct {
		name      string
		clientEnd bool // which end closes first
		reset     bool // RST instead of FIN
	}{
		{"client close", true, false},
		{"server close", false, false},
		{"client reset", true, true},
		{"server reset", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckLeaks(t)
			client, server, run := pumped(t, context.Background(), time.Minute)
			closer, other := client, server
			if !tc.clientEnd {
				closer, other = server, client
			}
			// Data crosses the pump first so it is mid-stream.
			other.Write([]byte("in flight"))
			closer.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(closer, make([]byte, 9)); err != nil {
				t.Fatal(err)
			}
			if tc.reset {
				closer.SetLinger(0)
			}
			closer.Close()
			_, err := testkit.ReadAllTimeout(t, other, 5*time.Second)
			if tc.reset {
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("other end read %v; want the reset passed on", err)
				}
			} else {
				if err != nil {
					t.Fatalf("other end read %v; want EOF", err)
				}
				// A FIN only ends one direction: the other end may still
				// send. Doing so hits the closed socket, whose RST the pump
				// passes on, as a direct connection would.
				deadline := time.Now().Add(5 * time.Second)
				for {
					if _, err := other.Write([]byte("more")); err != nil {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("writes to a closed peer kept succeeding")
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			st := run.Wait(t, 5*time.Second)
			if st.Err == nil {
				t.Fatal("pump reported no error for a reset")
			}
		})
	}
}

func TestPumpContextCancel(t *testing.T) {
	testkit.CheckLeaks(t)
	cause := errors.New("revoked for test")
	ctx, cancel := context.WithCancelCause(context.Background())
	client, _, run := pumped(t, ctx, time.Minute)
	cancel(cause)
	if st := run.Wait(t, 5*time.Second); !errors.Is(st.Err, cause) {
		t.Fatalf("err %v; want %v", st.Err, cause)
	}
	if _, err := testkit.ReadAllTimeout(t, client, 2*time.Second); !testkit.IsClosedOrReset(err) {
		t.Fatalf("client read after cancel: %v", err)
	}
}

// A TLS downstream leg: half-close arrives as close_notify, and the pump's
// CloseWrite on the TLS leg sends close_notify and then a TCP FIN.
func TestPumpTLSHalfClose(t *testing.T) {
	testkit.CheckLeaks(t)
	tlsClient, tlsA := tlsPair(t)
	b, server := testkit.TCPPair(t)
	run := startPump(t, context.Background(), tlsA, b, time.Minute)

	payload := bytes.Repeat([]byte("0123456789abcdef"), 10000) // several records
	if _, err := tlsClient.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := tlsClient.CloseWrite(); err != nil { // close_notify only, no FIN
		t.Fatal(err)
	}
	got, err := testkit.ReadAllTimeout(t, server, 5*time.Second)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("server got %d bytes, %v; want %d", len(got), err, len(payload))
	}
	server.Write([]byte("reply"))
	server.CloseWrite()
	got, err = testkit.ReadAllTimeout(t, tlsClient, 5*time.Second)
	if err != nil || string(got) != "reply" {
		t.Fatalf("tls client read %q, %v", got, err)
	}
	// close_notify has been consumed; the TCP stream must end too (FIN).
	rawClient := tlsClient.NetConn()
	rawClient.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := rawClient.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("raw read after close_notify: %d, %v; want EOF (FIN)", n, err)
	}
	if st := run.Wait(t, 5*time.Second); st.Err != nil || st.Sent != int64(len(payload)) || st.Received != 5 {
		t.Fatalf("stats %+v", st)
	}
}

// The buffered path must not use io.Copy's ReaderFrom shortcut (which
// allocates 32 KiB per call for a TCPConn destination).
func TestCopyBufferedAllocs(t *testing.T) {
	if testkit.RaceEnabled {
		// The race detector makes sync.Pool drop items at random; `make
		// unit` runs this test again without -race.
		t.Skip("allocation counts are meaningless under -race")
	}
	var ctr = new(countingDiscard)
	src := bytes.NewReader(make([]byte, 1<<20))
	allocs := testing.AllocsPerRun(20, func() {
		src.Seek(0, io.SeekStart)
		copyBuffered(ctr, struct{ io.Reader }{src}, &ctr.n)
	})
	if allocs > 1 {
		t.Fatalf("copyBuffered allocates %.1f times per copy; want pooled buffers", allocs)
	}
}

// When the user is over the kernel's pipe budget (every new pipe is tiny),
// TCP→TCP falls back to the buffered copy and still delivers everything.
func TestPumpFallsBackWithoutPipes(t *testing.T) {
	testkit.CheckLeaks(t)
	saved := pipes
	pipes = newPipePool(pipeWant, 64<<20, 4*pipeWant) // no pipe can be this large
	t.Cleanup(func() { pipes = saved })

	client, server, run := pumped(t, context.Background(), time.Minute)
	n := int64(4 << 20)
	go func() {
		io.Copy(client, &testkit.PatternReader{N: n, Seed: 3})
		client.CloseWrite()
	}()
	h := sha256.New()
	if m, err := io.Copy(h, server); err != nil || m != n {
		t.Fatalf("server got %d, %v; want %d", m, err, n)
	}
	if want := testkit.PatternSum(n, 3); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("checksum mismatch")
	}
	server.CloseWrite()
	if st := run.Wait(t, 5*time.Second); st.Err != nil || st.Sent != n {
		t.Fatalf("stats %+v", st)
	}
}

func TestPipePool(t *testing.T) {
	pp := newPipePool(pipeWant, pipeMin, pipeWant) // one idle pipe
	a, err := pp.get()
	if err != nil {
		t.Fatal(err)
	}
	if a.size < pipeMin {
		t.Fatalf("pipe size %d", a.size)
	}
	b, _ := pp.get()
	pp.put(a)
	pp.put(b) // pool holds one idle pipe: b is closed
	if c, _ := pp.get(); c != a {
		t.Fatal("idle pipe not reused")
	}
	a.close()
	if _, err := newPipePool(pipeWant, 64<<20, pipeWant).get(); !errors.Is(err, errSmallPipe) {
		t.Fatalf("impossible minimum: %v", err)
	}
}

// Near the end of the UID's pipe budget a pipe gets the largest size that
// still fits. (Past it, new pipes are born tiny: TestPipePool's impossible
// minimum covers that.)
func TestPipePoolSizeLadder(t *testing.T) {
	for _, tc := range []struct {
		limit int // the most the fake kernel grants
		want  int // resulting pipe size
	}{
		{limit: 1 << 20, want: 1 << 20},
		{limit: 512 << 10, want: 256 << 10},
		{limit: 256 << 10, want: 256 << 10},
		{limit: 100 << 10, want: 64 << 10},
		{limit: 64 << 10, want: 64 << 10},
	} {
		pp := newPipePool(1<<20, pipeMin, 1<<20)
		var tried []int
		pp.setSize = func(fd, size int) error {
			tried = append(tried, size)
			if size > tc.limit {
				return unix.EPERM
			}
			return setPipeSize(fd, size)
		}
		p, err := pp.get()
		switch {
		case err != nil:
			t.Errorf("limit %d: %v (tried %v)", tc.limit, err, tried)
		case p.size != tc.want:
			t.Errorf("limit %d: pipe of %d, want %d (tried %v)", tc.limit, p.size, tc.want, tried)
		}
		if p != nil {
			p.close()
		}
	}
}
