package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/pump"
)

// pumpRun is a pump.Pump running in the background.
type pumpRun = testkit.Run[pump.Stats]

// startPump runs pump.Pump(a, b) until the test ends (then both legs close).
func startPump(t testing.TB, ctx context.Context, a, b net.Conn, idle time.Duration) *pumpRun {
	t.Helper()
	return testkit.Go(t, func() pump.Stats { return pump.Pump(ctx, a, b, idle) }, func() { a.Close(); b.Close() })
}

// sessionPair is a TLS session over loopback TCP with pump.BatchConn under
// both ends, as MeshRouter and MeshAcceptor build them.
func sessionPair(t testing.TB) (client, server *tls.Conn) {
	t.Helper()
	return testkit.TLSPair(t, func(c *net.TCPConn) net.Conn { return pump.NewBatchConn(c) })
}
