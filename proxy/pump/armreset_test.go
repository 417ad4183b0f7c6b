package pump

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"golang.org/x/sys/unix"
)

// Armed legs (ArmReset, as ferry's handlers arm app-side sockets) still end
// cleanly: the half-close is a FIN, and the final close leaves the data
// the app has not read yet in flight and ends it with a FIN. Closing an
// armed socket would instead discard its send queue and send a reset: the
// client below reads only after the pump is done, so the whole reply is
// still queued in the kernel when the pump closes its leg.
func TestPumpArmedLegsCloseCleanly(t *testing.T) {
	testkit.CheckLeaks(t)
	client, a := testkit.TCPPair(t)
	b, server := testkit.TCPPair(t)
	ArmReset(a)
	ArmReset(b)
	// A small receive buffer on the client's side and a large send buffer
	// on the pump's: the reply fits, but most of it stays in the pump's
	// send queue until the client reads.
	_ = client.SetReadBuffer(16 << 10)
	_ = a.SetWriteBuffer(1 << 20)
	run := startPump(t, context.Background(), a, b, time.Minute)

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
	reply := bytes.Repeat([]byte("0123456789abcdef"), (256<<10)/16)
	go func() {
		server.Write(reply)
		server.CloseWrite()
	}()
	// The pump ends once it has handed the reply to the kernel; only then
	// does the client start reading.
	st := run.Wait(t, 10*time.Second)
	if st.Err != nil {
		t.Fatalf("pump: %v", st.Err)
	}
	got, err = testkit.ReadAllTimeout(t, client, 10*time.Second)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("client read %d of %d bytes, %v; want all and a clean EOF", len(got), len(reply), err)
	}
}

// An armed leg is reset when its socket is closed without the pump (the
// kernel closing a dead process's sockets is the same close(2)), even with
// nothing unread, where a plain close is a FIN.
func TestArmResetCloseIsReset(t *testing.T) {
	for _, armed := range []bool{false, true} {
		app, leg := testkit.TCPPair(t)
		if armed {
			ArmReset(leg)
		}
		leg.Close()
		buf := make([]byte, 1)
		app.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := app.Read(buf)
		switch {
		case armed && !isReset(err):
			t.Errorf("armed: app read %v, want a reset", err)
		case !armed && err != io.EOF:
			t.Errorf("not armed: app read %v, want EOF", err)
		}
	}
}

func isReset(err error) bool {
	var errno unix.Errno
	for e := err; e != nil; {
		if en, ok := e.(unix.Errno); ok {
			errno = en
			break
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return errno == unix.ECONNRESET
}

// The cost ferry adds per plain leg: one setsockopt to arm, one to disarm.
//
//	go test -run '^$' -bench ArmReset ./proxy/pump
func BenchmarkArmReset(b *testing.B) {
	_, leg := testkit.TCPPair(b)
	for b.Loop() {
		ArmReset(leg)
		disarm(leg)
	}
}
