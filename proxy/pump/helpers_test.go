package pump

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// pumpRun is a Pump running in the background.
type pumpRun = testkit.Run[Stats]

// pumped sets up client <-> [a Pump b] <-> server over loopback and runs
// Pump in the background.
func pumped(t testing.TB, ctx context.Context, idle time.Duration) (client, server *net.TCPConn, run *pumpRun) {
	t.Helper()
	client, a := testkit.TCPPair(t)
	b, server := testkit.TCPPair(t)
	return client, server, startPump(t, ctx, a, b, idle)
}

// startPump runs Pump(a, b) until the test ends (then both legs close).
func startPump(t testing.TB, ctx context.Context, a, b net.Conn, idle time.Duration) *pumpRun {
	t.Helper()
	return testkit.Go(t, func() Stats { return Pump(ctx, a, b, idle) }, func() { a.Close(); b.Close() })
}

// countingDiscard is an io.Writer that drops data; n is the atomic read
// counter copyBuffered wants.
type countingDiscard struct{ n atomic.Int64 }

func (c *countingDiscard) Write(p []byte) (int, error) { return len(p), nil }

// tlsPair returns the two ends of a TLS connection over loopback TCP, with
// the handshake done.
func tlsPair(t testing.TB) (client, server *tls.Conn) {
	t.Helper()
	return testkit.TLSPair(t, nil)
}

// batchedTLSPair is tlsPair with a BatchConn under both ends, as the mesh
// builds its sessions.
func batchedTLSPair(t testing.TB) (client, server *tls.Conn) {
	t.Helper()
	return testkit.TLSPair(t, func(c *net.TCPConn) net.Conn { return NewBatchConn(c) })
}
