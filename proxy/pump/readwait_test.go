package pump

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// A *tls.Conn can hold a complete record in its own buffer while its socket
// is empty. After a short read the pump releases its buffer and would wait
// on the socket; it must first drain what crypto/tls already holds, or the
// second record would sit there until the peer sends again.
func TestPumpTLSBufferedRecordNotStuck(t *testing.T) {
	t.Run("tls", func(t *testing.T) { testBufferedRecord(t, false) })
	// Upstream conns come wrapped by the catalog (a NetConn() pass-through).
	t.Run("wrapped", func(t *testing.T) { testBufferedRecord(t, true) })
}

type passThrough struct{ net.Conn }

func (p passThrough) NetConn() net.Conn { return p.Conn }
func (p passThrough) CloseWrite() error { return p.Conn.(*tls.Conn).CloseWrite() }

func testBufferedRecord(t *testing.T, wrap bool) {
	testkit.CheckLeaks(t)
	tlsClient, tlsA := tlsPair(t)
	b, server := testkit.TCPPair(t)
	// Two records, both in the socket before the pump's first read, so that
	// read pulls both into tls.Conn's buffer and returns only the first.
	for _, s := range []string{"first", "second"} {
		if _, err := tlsClient.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond) // let both records land (not a readiness signal: only makes the case likelier)
	var src net.Conn = tlsA
	if wrap {
		src = passThrough{tlsA}
	}
	startPump(t, context.Background(), src, b, time.Minute)

	server.SetReadDeadline(time.Now().Add(3 * time.Second))
	got := make([]byte, len("firstsecond"))
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "firstsecond" {
		t.Fatalf("server read %q, %v; want firstsecond without further client data", got, err)
	}
	// The connection still works both ways after the idle wait.
	if _, err := tlsClient.Write([]byte("third")); err != nil {
		t.Fatal(err)
	}
	got = got[:5]
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "third" {
		t.Fatalf("server read %q, %v", got, err)
	}
	if _, err := server.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	tlsClient.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(tlsClient, got[:4]); err != nil || string(got[:4]) != "back" {
		t.Fatalf("client read %q, %v", got[:4], err)
	}
}

// A peer's reset that arrives while a direction waits must reach the next
// read as ECONNRESET: the wait may not consume the socket's pending error,
// or the read sees a clean EOF and the pump passes a reset on as a clean
// end (audit F4; TestAbortCrossesMeshHop failed now and then on it).
func TestReadWaiterKeepsReset(t *testing.T) {
	for range 20 {
		a, b := testkit.TCPPair(t)
		if _, err := b.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 8)
		if _, err := a.Read(buf); err != nil {
			t.Fatal(err)
		}
		b.SetLinger(0)
		b.Close()
		w := NewReadWaiter(a)
		if w == nil {
			t.Fatal("no read waiter for a TCP conn")
		}
		w.Wait()
		if _, err := a.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after the wait: %v; want ECONNRESET", err)
		}
	}
}
