package tunnel

import (
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/ferrymesh/ferry/proxy/pump"
	"golang.org/x/sys/unix"
)

// Frame-aware splice over a kernel TLS session (pump.FrameSplicer): the
// kernel seals and opens the records, and DATA payloads move between the
// app's socket and the session's socket through a pipe, never through
// ferry's memory. Headers and control frames are plain writes and reads
// on the session.
//
// app → tunnel: splice(app → pipe, up to a chunk) gives n; the DATA header
// goes out with MSG_MORE, then splice(pipe → session, n), so header and
// payload fill the same records. While the tunnel may still be replayed
// (a client before the server's first frame, goaway.go) the chunk is read
// out of the pipe instead and written as before, so the replay copy holds
// it; so is a chunk after a resume on a new session.
//
// tunnel → app: the header is read from the session (kernel TLS returns
// partial records), then exactly its payload is spliced to the app. A
// splice that stops (a record that is not data: EINVAL; the socket's end)
// hands over to the session's Read for that chunk, which says what the
// record was (a ticket is skipped, close_notify or a FIN breaks the
// session).

// spliceChunk bounds one splice: the pump's buffer size.
const spliceChunk = 64 << 10

// kernelSession is a Session whose records the kernel seals and opens
// (*ktls.Conn).
type kernelSession interface {
	TCPConn() *net.TCPConn
	Buffered() int
}

// Spliced is the payload this tunnel moved by splice, both ways (tests
// and logs: proof that the kernel path was taken).
func (t *Conn) Spliced() int64 { return t.spliced.Load() }

// SpliceFrames: the session is in the kernel (pump.FrameSplicer).
func (t *Conn) SpliceFrames() bool { return t.ks != nil }

// SpliceTo moves the tunnel's stream into dst until the peer's EOF frame.
func (t *Conn) SpliceTo(dst *net.TCPConn) (int64, error) {
	var written int64
	for {
		if nt := t.next.Load(); nt != nil {
			m, err := nt.spliceOrCopyTo(dst)
			return written + m, err
		}
		if t.remaining == 0 {
			if t.rerr == nil {
				t.rerr = t.nextFrame()
			}
			switch err := t.rerr; {
			case err == errResumed:
				t.rerr = nil
				continue
			case err == io.EOF:
				return written, nil
			case err != nil:
				t.rerr = nil
				return written, err
			}
		}
		var n int64
		var err error
		if t.ks.Buffered() == 0 {
			n, err = pump.SpliceChunk(dst, t.ks.TCPConn(), min(t.remaining, spliceChunk))
			t.remaining -= int(n)
			written += n
			t.spliced.Add(n)
		}
		switch {
		case err == nil && n > 0:
			continue
		case err == nil, err == pump.ErrNoPipe, errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.EIO):
			// Held data, the socket's end, a control record, or no pipe:
			// this chunk through Read, which knows what each means.
			m, err := t.copyChunk(dst)
			written += m
			if err != nil {
				return written, err
			}
		default:
			return written, t.fail(err)
		}
	}
}

// copyChunk copies up to one buffer of the current payload through Read.
func (t *Conn) copyChunk(dst io.Writer) (int64, error) {
	bp := pump.GetBuffer()
	defer pump.PutBuffer(bp)
	n, err := t.Read((*bp)[:min(len(*bp), t.remaining)])
	if n > 0 {
		if _, werr := dst.Write((*bp)[:n]); werr != nil {
			return 0, werr
		}
	}
	return int64(n), err
}

// spliceOrCopyTo is SpliceTo on a resumed tunnel, which may be in user
// space.
func (t *Conn) spliceOrCopyTo(dst *net.TCPConn) (int64, error) {
	if t.ks != nil {
		return t.SpliceTo(dst)
	}
	var written int64
	for {
		bp := pump.GetBuffer()
		n, err := t.Read(*bp)
		if n > 0 {
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				pump.PutBuffer(bp)
				return written, werr
			}
			written += int64(n)
		}
		pump.PutBuffer(bp)
		if err == io.EOF {
			return written, nil
		}
		if err != nil {
			return written, err
		}
	}
}

// SpliceFrom moves src's stream into the tunnel as DATA frames until
// src's end; the pump then sends EOF (CloseWrite).
func (t *Conn) SpliceFrom(src *net.TCPConn) (int64, error) {
	bp := pump.GetBuffer()
	defer pump.PutBuffer(bp)
	buf := (*bp)[:spliceChunk]
	var written int64
	for {
		var copied []byte
		locked := false
		n, kept, err := pump.SpliceChunkAfter(t.ks.TCPConn(), src, spliceChunk, buf, func(n int) (bool, error) {
			t.wmu.Lock()
			locked = true
			if t.next.Load() != nil || t.copyOK {
				return true, nil // through Write: the replay's copy or its session
			}
			hdr := [frameHeader]byte{frameData, byte(n >> 16), byte(n >> 8), byte(n)}
			return false, t.sendMore(hdr[:])
		})
		if locked {
			t.wmu.Unlock()
		}
		copied = kept
		switch {
		case err == pump.ErrNoPipe:
			// No pipe: this chunk through a buffer.
			m, rerr := src.Read(buf)
			if m > 0 {
				if _, werr := t.Write(buf[:m]); werr != nil {
					return written, werr
				}
				written += int64(m)
			}
			if rerr == io.EOF {
				return written, nil
			}
			if rerr != nil {
				return written, rerr
			}
			continue
		case err != nil:
			if locked {
				return written, t.fail(err) // the session; a reset of the app is the pump's
			}
			return written, err
		case n == 0:
			return written, nil
		}
		if copied != nil {
			if _, werr := t.Write(copied); werr != nil {
				return written, werr
			}
		} else {
			t.spliced.Add(n)
		}
		written += n
	}
}

// sendMore writes p (a DATA header) on the kernel socket with MSG_MORE:
// the kernel keeps the record open for the payload spliced next.
func (t *Conn) sendMore(p []byte) error {
	rc, err := t.ks.TCPConn().SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	werr := rc.Write(func(fd uintptr) bool {
		for len(p) > 0 {
			n, e := unix.SendmsgN(int(fd), p, nil, nil, unix.MSG_MORE)
			switch e {
			case nil:
				p = p[n:]
			case unix.EINTR:
			case unix.EAGAIN:
				return false
			default:
				serr = e
				return true
			}
		}
		return true
	})
	if werr != nil {
		return werr
	}
	return serr
}
