package pump

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// BatchConn sits under a *tls.Conn so that one tls.Write of several
// records goes out in one write(2) instead of one per record (crypto/tls
// writes each record as soon as it is sealed). Fewer, larger writes mean
// fewer wakeups of the reader on the other end, which on a CPU-bound host
// costs more than the bytes themselves.
//
// Writes are batched only between Begin and Flush, which the pump calls
// around a large tls.Write; every other write (handshake, alerts, a
// KeyUpdate answered by the reading goroutine) goes straight through,
// unless a batch is open, in which case it joins the batch to keep the
// record order. A write never waits for a flush in progress, so a Close
// that sends close_notify cannot hang behind a stalled peer.
type BatchConn struct {
	*net.TCPConn
	mu    sync.Mutex
	batch *[]byte // non-nil while a batch is open or being flushed
	// sawEOF: a read met the end of the TCP stream. When crypto/tls then
	// reports io.EOF, the peer sent no close_notify (see errTruncated).
	sawEOF atomic.Bool
}

// A batch holds one tls.Write of up to bigBufSize plaintext: its records
// (22 bytes of header, content type and tag each) and room to spare for an
// alert or KeyUpdate joining it.
var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, bigBufSize+16<<10); return &b }}

// NewBatchConn wraps the TCP conn a *tls.Conn is built over.
func NewBatchConn(c net.Conn) net.Conn {
	if tc, ok := c.(*net.TCPConn); ok {
		return &BatchConn{TCPConn: tc}
	}
	return c
}

// NetConn returns the TCP conn (for TCPOf: linger, TCP_INFO, the idle wait).
func (c *BatchConn) NetConn() net.Conn { return c.TCPConn }

func (c *BatchConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if err == io.EOF {
		c.sawEOF.Store(true)
	}
	return n, err
}

func (c *BatchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.batch != nil {
		*c.batch = append(*c.batch, p...)
		c.mu.Unlock()
		return len(p), nil
	}
	c.mu.Unlock()
	return c.TCPConn.Write(p)
}

// Begin opens a batch: writes are gathered until Flush.
func (c *BatchConn) Begin() {
	c.mu.Lock()
	if c.batch == nil {
		c.batch = batchPool.Get().(*[]byte)
	}
	c.mu.Unlock()
}

// Flush writes the batch and closes it. Writes arriving meanwhile go into
// a fresh batch, written next.
func (c *BatchConn) Flush() error {
	var err error
	c.mu.Lock()
	for {
		bp := c.batch
		if bp == nil {
			c.mu.Unlock()
			return err
		}
		if len(*bp) == 0 || err != nil {
			c.batch = nil
			c.mu.Unlock()
			putBatch(bp)
			return err
		}
		c.batch = batchPool.Get().(*[]byte)
		c.mu.Unlock()
		_, err = c.TCPConn.Write(*bp)
		putBatch(bp)
		c.mu.Lock()
	}
}

func putBatch(bp *[]byte) {
	if cap(*bp) > 2*bigBufSize {
		return // grown by an unusual write; let it go
	}
	*bp = (*bp)[:0]
	batchPool.Put(bp)
}

// batcherOf returns the BatchConn under a *tls.Conn destination (through
// NetConn() pass-through wrappers), or nil.
func batcherOf(c any) *BatchConn {
	for range 4 {
		switch v := c.(type) {
		case Framed:
			return nil // batches each frame itself
		case *tls.Conn:
			return BatchOf(v)
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// BatchOf returns the BatchConn a *tls.Conn was built over, or nil. It
// looks through the pass-through wrappers that may sit between (a kernel
// TLS handoff's cork, when the session stayed in user space).
func BatchOf(tc *tls.Conn) *BatchConn {
	return under[*BatchConn](tc.NetConn())
}
