package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// tlsMaxPlaintext is the payload of a full TLS record: a read from a
// *tls.Conn returns at most one record, so anything less is a short read.
const tlsMaxPlaintext = 16 << 10

// aLongTimeAgo is a read deadline that has passed: a read then fails at
// once, without a syscall, unless it can be served from user-space buffers.
var aLongTimeAgo = time.Unix(1, 0)

// readWaiter lets copyBuffered wait for the next bytes of an idle source
// without holding a copy buffer: it parks on the socket under the source
// with a MSG_PEEK probe that reports "not yet" on EAGAIN, so the runtime
// poller keeps the goroutine asleep until the kernel has data (or EOF, or
// an error, which the following real read then reports).
//
// A *tls.Conn may already hold bytes read from the socket (a complete
// record in its input buffer) while the socket itself is empty; waiting on
// the socket then would hang. pending checks that first with a read under
// an expired deadline, which crypto/tls serves from its buffer or fails
// with a timeout it treats as temporary (the connection stays usable).
type readWaiter struct {
	rc    syscall.RawConn
	tls   *tls.Conn
	full  int // a read shorter than this means the sender paused
	first bool
	probe func(fd uintptr) bool
}

// newReadWaiter returns nil for sources it cannot see through. It looks
// through pass-through wrappers that expose NetConn() (catalog's tracked
// upstream conns) down to a plain *net.TCPConn or a *tls.Conn directly
// over one, whose buffering is known. A wrapper with NetConn() must not
// buffer reads itself.
func newReadWaiter(src any) *readWaiter {
	var tc *net.TCPConn
	var tlsc *tls.Conn
	full := bufSize
	c, _ := src.(net.Conn)
	for range 4 { // bounded unwrap
		switch s := c.(type) {
		case *tunnelConn:
			return nil // frames: copyBuffered waits on the tunnel itself
		case *net.TCPConn:
			tc = s
		case *tls.Conn:
			// Only our own batchConn may sit between: it buffers no reads.
			var raw net.Conn = s.NetConn()
			if b, ok := raw.(*batchConn); ok {
				raw = b.TCPConn
			}
			if r, ok := raw.(*net.TCPConn); ok {
				tc, tlsc, full = r, s, tlsMaxPlaintext
			}
		case interface{ NetConn() net.Conn }:
			c = s.NetConn()
			continue
		}
		break
	}
	if tc == nil {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	w := &readWaiter{rc: rc, tls: tlsc, full: full}
	w.probe = w.peek
	return w
}

// tryRead reads from the *tls.Conn only what it has already buffered: it
// returns data, a real error, or a timeout when a read would have to wait
// for the socket (a partial record may stay buffered; the socket becomes
// readable when the rest of it arrives).
func (w *readWaiter) tryRead(buf []byte) (int, error) {
	if err := w.tls.SetReadDeadline(aLongTimeAgo); err != nil {
		return w.tls.Read(buf)
	}
	n, err := w.tls.Read(buf)
	_ = w.tls.SetReadDeadline(time.Time{})
	return n, err
}

// more appends to buf[:n] the full records the *tls.Conn has buffered,
// without waiting for the socket.
func (w *readWaiter) more(buf []byte, n int) (int, error) {
	for len(buf)-n >= tlsMaxPlaintext {
		m, err := w.tryRead(buf[n:])
		n += m
		if isTimeout(err) {
			return n, nil
		}
		if err != nil || m < tlsMaxPlaintext {
			return n, err
		}
	}
	return n, nil
}

// wait parks until the socket is readable. Errors are left to the next
// read, which reports them with the connection's context.
func (w *readWaiter) wait() {
	w.first = true
	_ = w.rc.Read(w.probe)
}

func (w *readWaiter) peek(fd uintptr) bool {
	if !w.first {
		// Woken by the poller: let the real read find out what arrived.
		return true
	}
	w.first = false
	return readable(fd)
}

// readable reports, without consuming anything or blocking, whether the
// socket has something for a read: data, EOF or an error. It polls rather
// than peeks: a recv(MSG_PEEK) that meets a pending error (a reset)
// returns it and clears it from the socket, and the real read that follows
// then sees only the shutdown the reset left and reports a clean EOF, a
// reset turned into a normal end.
func readable(fd uintptr) bool {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	for {
		n, err := unix.Poll(pfd, 0)
		if err != unix.EINTR {
			return err != nil || n > 0
		}
	}
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
