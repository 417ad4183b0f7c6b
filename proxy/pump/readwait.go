package pump

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// TLSMaxPlaintext is the payload of a full TLS record: a read from a
// *tls.Conn returns at most one record, so anything less is a short read.
const TLSMaxPlaintext = 16 << 10

// aLongTimeAgo is a read deadline that has passed: a read then fails at
// once, without a syscall, unless it can be served from user-space buffers.
var aLongTimeAgo = time.Unix(1, 0)

// ReadWaiter lets copyBuffered (and a Framed leg waiting for its next
// header) wait for the next bytes of an idle source without holding a copy
// buffer: it parks on the socket under the source with a probe (Readable)
// that reports "not yet" while there is nothing to read, so the runtime
// poller keeps the goroutine asleep until the kernel has data (or EOF, or
// an error, which the following real read then reports).
//
// A *tls.Conn may already hold bytes read from the socket (a complete
// record in its input buffer) while the socket itself is empty; waiting on
// the socket then would hang. pending checks that first with a read under
// an expired deadline, which crypto/tls serves from its buffer or fails
// with a timeout it treats as temporary (the connection stays usable).
type ReadWaiter struct {
	rc    syscall.RawConn
	tls   *tls.Conn
	full  int // a read shorter than this means the sender paused
	first bool
	probe func(fd uintptr) bool
}

// NewReadWaiter returns nil for sources it cannot see through. It looks
// through pass-through wrappers that expose NetConn() (catalog's tracked
// upstream conns) down to a plain *net.TCPConn or a *tls.Conn directly
// over one, whose buffering is known. A wrapper with NetConn() must not
// buffer reads itself.
func NewReadWaiter(src any) *ReadWaiter {
	var tc *net.TCPConn
	var tlsc *tls.Conn
	full := bufSize
	c, _ := src.(net.Conn)
	for range 4 { // bounded unwrap
		switch s := c.(type) {
		case Framed:
			return nil // frames: copyBuffered waits on the leg itself
		case *net.TCPConn:
			tc = s
		case *tls.Conn:
			// Only our own BatchConn may sit between, possibly under a
			// kernel TLS handoff's cork that the session stayed in user
			// space from: neither buffers reads.
			var raw net.Conn = s.NetConn()
			if b := BatchOf(s); b != nil {
				raw = b.TCPConn
			}
			if r, ok := raw.(*net.TCPConn); ok {
				tc, tlsc, full = r, s, TLSMaxPlaintext
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
	w := &ReadWaiter{rc: rc, tls: tlsc, full: full}
	w.probe = w.peek
	return w
}

// TryRead reads from the *tls.Conn only what it has already buffered: it
// returns data, a real error, or a timeout when a read would have to wait
// for the socket (a partial record may stay buffered; the socket becomes
// readable when the rest of it arrives).
func (w *ReadWaiter) TryRead(buf []byte) (int, error) {
	if err := w.tls.SetReadDeadline(aLongTimeAgo); err != nil {
		return w.tls.Read(buf)
	}
	n, err := w.tls.Read(buf)
	_ = w.tls.SetReadDeadline(time.Time{})
	return n, err
}

// More appends to buf[:n] the full records the *tls.Conn has buffered,
// without waiting for the socket.
func (w *ReadWaiter) More(buf []byte, n int) (int, error) {
	for len(buf)-n >= TLSMaxPlaintext {
		m, err := w.TryRead(buf[n:])
		n += m
		if IsTimeout(err) {
			return n, nil
		}
		if err != nil || m < TLSMaxPlaintext {
			return n, err
		}
	}
	return n, nil
}

// Wait parks until the socket is readable. Errors are left to the next
// read, which reports them with the connection's context.
func (w *ReadWaiter) Wait() {
	w.first = true
	_ = w.rc.Read(w.probe)
}

func (w *ReadWaiter) peek(fd uintptr) bool {
	if !w.first {
		// Woken by the poller: let the real read find out what arrived.
		return true
	}
	w.first = false
	return Readable(fd)
}

// Readable reports, without consuming anything or blocking, whether the
// socket has something for a read: data, EOF or an error. It asks poll(2),
// not a MSG_PEEK read: a peek returns a pending error (a peer's reset) and
// clears it, so the real read after it saw a clean EOF instead.
func Readable(fd uintptr) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if err != unix.EINTR {
			return err != nil || (n > 0 && fds[0].Revents != 0)
		}
	}
}

func IsTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
