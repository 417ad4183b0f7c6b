package tunnel

import (
	"crypto/tls"
	"net"
	"testing"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/pump"
)

// sessionPair is a TLS session over loopback TCP with pump.BatchConn under
// both ends, as the mesh builds them.
func sessionPair(t testing.TB) (client, server *tls.Conn) {
	t.Helper()
	return testkit.TLSPair(t, func(c *net.TCPConn) net.Conn { return pump.NewBatchConn(c) })
}
