package ktls

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync/atomic"
)

const recordHeaderLen = 5

// cork sits under crypto/tls during the handshake and never returns more
// than the rest of the current record from a Read. crypto/tls reads ahead
// ("there might be extra input waiting on the wire"): without the cork,
// records the peer sent right after its Finished (application data, a
// session ticket) would land in the tls.Conn's buffer, and the kernel,
// handed the socket, would start in the middle of the stream (measured in
// UML: 20 of 20 connections failed with EMSGSIZE or EINVAL).
//
// After release, reads pass straight through again (the user-space
// fallback keeps crypto/tls's read-ahead) once the record in progress has
// been read. Read is not safe for concurrent use; crypto/tls serializes
// its reads.
type cork struct {
	net.Conn // what the handshake reads and writes (the TCP conn or a pass-through wrapper)

	hdr      [recordHeaderLen]byte
	hdrLen   int // header bytes read so far
	hdrOut   int // header bytes handed out so far
	left     int // body bytes of the current record not yet read
	released atomic.Bool
}

func newCork(c net.Conn) *cork { return &cork{Conn: c} }

// NetConn returns the conn under the cork, so callers can look through it
// the way they look through a *tls.Conn.
func (c *cork) NetConn() net.Conn { return c.Conn }

func (c *cork) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.atBoundary() && c.released.Load() {
		return c.Conn.Read(p)
	}
	if c.hdrLen < recordHeaderLen {
		n, err := c.Conn.Read(c.hdr[c.hdrLen:])
		c.hdrLen += n
		if c.hdrLen < recordHeaderLen {
			if err == io.EOF && c.hdrLen > 0 {
				err = io.ErrUnexpectedEOF
			}
			return 0, err // crypto/tls reads again on (0, nil)
		}
		c.left = int(binary.BigEndian.Uint16(c.hdr[3:5]))
	}
	if c.hdrOut < recordHeaderLen {
		n := copy(p, c.hdr[c.hdrOut:])
		c.hdrOut += n
		if c.hdrOut == recordHeaderLen && c.left == 0 {
			c.reset()
		}
		return n, nil
	}
	if len(p) > c.left {
		p = p[:c.left]
	}
	n, err := c.Conn.Read(p)
	c.left -= n
	if c.left == 0 {
		c.reset()
	}
	return n, err
}

func (c *cork) reset() { c.hdrLen, c.hdrOut, c.left = 0, 0, 0 }

// atBoundary reports whether everything read so far ends on a record
// boundary: the condition for handing the socket to the kernel. Call it
// only when no Read is in progress.
func (c *cork) atBoundary() bool { return c.hdrLen == 0 && c.left == 0 }

// release stops corking once the record in progress has been read.
func (c *cork) release() { c.released.Store(true) }

// CloseWrite half-closes the conn under the cork (for the user-space
// fallback, whose half-close sends close_notify and then a FIN).
func (c *cork) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}
