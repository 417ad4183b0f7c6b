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

// fakeKernelSession stands for a *ktls.Conn over a plain socket: a Session,
// a pump.KernelTLS leg (kernelLeg adds TCPConn), a vector writer, and a
// kernel session whose payloads the tunnel splices.
type fakeKernelSession struct {
	*net.TCPConn
	copied atomic.Int64 // bytes through Read, Write and WriteBuffers
}

func newKernelSession(c *net.TCPConn) *fakeKernelSession { return &fakeKernelSession{TCPConn: c} }

func (k *fakeKernelSession) NetConn() net.Conn                    { return k.TCPConn }
func (k *fakeKernelSession) ConnectionState() tls.ConnectionState { return tls.ConnectionState{} }

func (k *fakeKernelSession) WriteBuffers(b *net.Buffers) (int64, error) {
	n, err := b.WriteTo(k.TCPConn)
	k.copied.Add(n)
	return n, err
}

func (k *fakeKernelSession) Write(p []byte) (int, error) {
	n, err := k.TCPConn.Write(p)
	k.copied.Add(int64(n))
	return n, err
}

func (k *fakeKernelSession) Read(p []byte) (int, error) {
	n, err := k.TCPConn.Read(p)
	k.copied.Add(int64(n))
	return n, err
}

func (k *fakeKernelSession) Buffered() int { return 0 }

// kernelLeg gives fakeKernelSession pump.KernelTLS's TCPConn() method, which
// the embedded field's name rules out on the struct itself.
type kernelLeg struct{ *fakeKernelSession }

func (k kernelLeg) TCPConn() *net.TCPConn { return k.fakeKernelSession.TCPConn }
