package tunnel

import (
	"crypto/tls"
	"net"
	"sync/atomic"
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

// kernelSession stands for a *ktls.Conn over a plain socket: a Session,
// a pump.KernelTLS leg (kernelLeg adds TCPConn), and a vector writer.
type kernelSession struct {
	*net.TCPConn
	vectors atomic.Int32
}

func newKernelSession(c *net.TCPConn) *kernelSession { return &kernelSession{TCPConn: c} }

func (k *kernelSession) NetConn() net.Conn                    { return k.TCPConn }
func (k *kernelSession) ConnectionState() tls.ConnectionState { return tls.ConnectionState{} }

func (k *kernelSession) WriteBuffers(b *net.Buffers) (int64, error) {
	k.vectors.Add(1)
	return b.WriteTo(k.TCPConn)
}

// kernelLeg gives kernelSession pump.KernelTLS's TCPConn() method, which
// the embedded field's name rules out on the struct itself.
type kernelLeg struct{ *kernelSession }

func (k kernelLeg) TCPConn() *net.TCPConn { return k.kernelSession.TCPConn }
