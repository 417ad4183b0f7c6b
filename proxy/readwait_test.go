package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	checkLeaks(t)
	tlsClient, tlsA := tlsPair(t)
	b, server := tcpPair(t)
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

// Waiting for a reset socket to become readable must leave the reset for
// the read: a MSG_PEEK probe used to consume the pending ECONNRESET, and the
// read after it reported a clean EOF (a reset turned into a normal end).
func TestReadWaiterKeepsPendingReset(t *testing.T) {
	client, server := tcpPair(t)
	server.SetLinger(0)
	server.Close()
	// Block until the reset has arrived, so the waiter's probe meets it.
	rc, err := client.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 5000)
	})
	w := newReadWaiter(client)
	w.wait()
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after the wait: %v, want ECONNRESET", err)
	}
}
