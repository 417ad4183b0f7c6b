package tunnel

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/proxy/pump"
)

// Between two ferry sidecars, one mTLS session carries app connections one
// after another instead of one handshake per app connection: a "tunnel".
// A new connection then costs an OPEN frame instead of a TCP connect, a TLS
// handshake (still a full key exchange when resumed) and a TCP close on
// both sides: for short connections that was most of a sidecar's CPU.
//
// Both ends offer the protocol by ALPN (the ALPN constant); a peer that does not
// know it (Consul's built-in proxy, Envoy) negotiates nothing and gets the
// one-connection-per-session protocol as before.
//
// On the wire, after the handshake, the client sends per app connection:
// OPEN, then DATA frames and one EOF (its half-close); the server sends
// DATA frames and one EOF. Either side may instead send RESET: its app
// connection was aborted (a reset, a truncated stream), and the other side
// resets its app connection too rather than end it cleanly; the session
// is then closed. A frame is a 4-byte header (type, 24-bit
// length) and, for DATA, that many bytes. After both EOFs the session is
// idle and either side may close it; only the client opens the next
// tunnel, and only on a session it saw end cleanly. Anything else (a TLS
// EOF inside a tunnel, an unknown frame) breaks the session: the app
// connection ends with an error, as it would on a reset, and the session
// is closed, never reused. A missing EOF frame is never taken for the end
// of the stream, just as TLS close_notify guards against truncation.
//
// Between tunnels the server may end the session (drain, age, the peer no
// longer verifying, idle): it then sends GOAWAY instead of reading the next
// OPEN. An OPEN the client sent meanwhile was not taken, so the client
// starts that connection again on a fresh session (goaway.go).
const ALPN = "ferry/1"

const (
	frameData = 0
	frameEOF  = 1
	frameOpen = 2
	// frameReset aborts the tunnel (Pump's abort). A peer that does not
	// know it breaks the session, which its Pump passes on as an abort too.
	frameReset = 3
	// frameGoAway: the server ends the session between tunnels; an OPEN in
	// flight was not taken (goaway.go). An older client breaks the session
	// on it, as it did on the close_notify that used to come alone.
	frameGoAway = 4

	frameHeader = 4
	maxFrame    = 1<<24 - 1
)

// How long sessions live for reuse. The client reuses a session idle for
// less than tunnelIdle and younger than tunnelMaxAge, so rotated roots or
// leaves and changed trust are re-checked by a fresh handshake within
// tunnelMaxAge; the server refuses new tunnels on older sessions (2x, so a
// compliant client never meets that) and closes sessions idle for
// ServerIdle (3x the client's, so a client does not pick a session
// the server is closing).
const (
	tunnelIdle   = 10 * time.Second
	tunnelMaxAge = time.Minute
	ServerIdle   = 3 * tunnelIdle
	ServerMaxAge = 2 * tunnelMaxAge
)

// Session is what a tunnel session runs over: a *tls.Conn (user-space
// TLS), or a *ktls.Conn whose records the kernel seals and opens (a
// session agreed as kernel TLS, see proxy/ktls.go). Frames and their rules
// are the same over both.
type Session interface {
	net.Conn
	// CloseWrite sends close_notify (and, for a kernel session, a FIN).
	CloseWrite() error
	ConnectionState() tls.ConnectionState
}

// vectorWriter is a session that writes several buffers in one writev(2)
// (*ktls.Conn): a DATA header and its payload then fill the same records,
// and the header costs no record, seal and syscall of its own.
type vectorWriter interface {
	WriteBuffers(b *net.Buffers) (int64, error)
}

// errTunnelBroken marks a session that ended inside a tunnel.
var errTunnelBroken = errors.New("tunnel: session ended without the peer's EOF frame")

// errTunnelReset is the peer's RESET frame; it wraps ECONNRESET, which is
// what the app would have seen on a direct connection.
var errTunnelReset = fmt.Errorf("tunnel: peer reset the connection: %w", syscall.ECONNRESET)

// Conn is one app connection over a session (a net.Conn with CloseWrite,
// a pump.Framed and a pump.Aborter). Reads and writes each
// come from one goroutine (the pump's halves); Close may come from any.
type Conn struct {
	tc      Session
	r       io.Reader        // tc, or a plain stream in the frame fuzz test
	batch   *pump.BatchConn  // under a *tls.Conn: a frame header and its data in one write(2)
	rw      *pump.ReadWaiter // under a *tls.Conn: gathers records crypto/tls already holds
	vw      vectorWriter     // a kernel session: header and data in one writev(2)
	ks      kernelSession    // a kernel session: payloads spliced (splice.go)
	spliced atomic.Int64

	// reading side
	hdr       [frameHeader]byte
	hdrN      int   // bytes of hdr read so far
	remaining int   // DATA bytes of the current frame not yet read
	rerr      error // from wait, for the next Read

	gotEOF, sentEOF, broken, closed atomic.Bool

	// wmu keeps frames whole: the pump's writing half and an abort's RESET
	// frame come from different goroutines.
	wmu sync.Mutex

	// release is called once (releaseOnce), by Close: clean means both
	// EOFs went by and the session may carry another tunnel. It owns the
	// session after.
	release  func(clean bool)
	released atomic.Bool

	replay // a client's way past a GOAWAY (goaway.go)
}

// NewConn starts a tunnel over session tc (after OPEN: WriteOpen on the
// client, ReadOpen on the server). release is called once, by Close:
// clean means both EOFs went by and the session may carry another tunnel.
func NewConn(tc Session, release func(clean bool)) *Conn {
	t := &Conn{tc: tc, r: tc, release: release}
	switch s := tc.(type) {
	case *tls.Conn:
		t.batch = pump.BatchOf(s)
		t.rw = pump.NewReadWaiter(s)
	case vectorWriter:
		// A kernel session buffers nothing in user space that the socket
		// would not show: WaitFrame reads the header itself, and a read
		// there is shallow (no TLS stack to keep grown).
		t.vw = s
		t.ks, _ = tc.(kernelSession)
	}
	return t
}

// WaitFrame parks until the next frame header is in (or the stream ends),
// without a copy buffer: the pump's idle wait for a tunnel (pump.Framed).
// Like pump.ReadWaiter, it first takes what crypto/tls already holds, then parks on
// the socket itself rather than inside a TLS read (whose deeper stack
// would stay grown for every idle connection).
func (t *Conn) WaitFrame() {
	if nt := t.next.Load(); nt != nil {
		nt.WaitFrame()
		return
	}
	if t.remaining != 0 || t.rerr != nil || t.gotEOF.Load() {
		return
	}
	if t.rw != nil && t.hdrN < frameHeader {
		n, err := t.rw.TryRead(t.hdr[t.hdrN:])
		t.hdrN += n
		switch {
		case pump.IsTimeout(err):
			if t.hdrN == 0 {
				t.rw.Wait()
			}
		case err != nil:
			t.rerr = t.fail(err)
			return
		}
	}
	t.rerr = t.nextFrame()
	if t.rerr == errResumed {
		t.rerr = nil
		t.next.Load().WaitFrame()
	}
}

// nextFrame reads headers up to the next DATA frame with a payload.
// FrameRemaining is the current DATA frame's payload not yet read
// (pump.Framed): at 0 the pump lets its buffer go until WaitFrame returns.
func (t *Conn) FrameRemaining() int {
	if nt := t.next.Load(); nt != nil {
		return nt.FrameRemaining()
	}
	return t.remaining
}

func (t *Conn) nextFrame() error {
	if t.gotEOF.Load() {
		return io.EOF
	}
	for {
		if t.hdrN < frameHeader {
			n, err := io.ReadFull(t.r, t.hdr[t.hdrN:])
			t.hdrN += n
			if err != nil {
				return t.fail(err)
			}
		}
		t.hdrN = 0
		typ, n := t.hdr[0], int(t.hdr[1])<<16|int(t.hdr[2])<<8|int(t.hdr[3])
		if !t.accepted.Load() {
			if typ == frameGoAway && n == 0 {
				return t.resume()
			}
			t.accepted.Store(true) // the peer took the tunnel
			t.dropKept()
		}
		switch {
		case typ == frameData && n > 0:
			t.remaining = n
			return nil
		case typ == frameData:
		case typ == frameEOF && n == 0:
			t.gotEOF.Store(true)
			return io.EOF
		case typ == frameReset && n == 0:
			return t.fail(errTunnelReset)
		default:
			return t.fail(fmt.Errorf("tunnel: unexpected frame type %d length %d", typ, n))
		}
	}
}

func (t *Conn) fail(err error) error {
	t.broken.Store(true)
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		return errTunnelBroken
	}
	return err
}

func (t *Conn) Read(p []byte) (int, error) {
	if nt := t.next.Load(); nt != nil {
		return nt.Read(p)
	}
	if t.remaining == 0 {
		if t.rerr == nil {
			t.rerr = t.nextFrame()
		}
		if t.rerr == errResumed {
			t.rerr = nil
			return t.next.Load().Read(p)
		}
		if err := t.rerr; err != nil {
			if err != io.EOF {
				t.rerr = nil // a deadline may be retried; a broken session stays broken
			}
			return 0, err
		}
	}
	k := min(len(p), t.remaining)
	n, err := t.r.Read(p[:k])
	if err == nil && n == pump.TLSMaxPlaintext && k > n && t.rw != nil {
		n, err = t.rw.More(p[:k], n)
	}
	t.remaining -= n
	if err != nil {
		return n, t.fail(err)
	}
	return n, nil
}

func (t *Conn) Write(p []byte) (int, error) {
	if nt := t.next.Load(); nt != nil {
		return nt.Write(p)
	}
	written := 0
	for len(p) > 0 {
		n := min(len(p), maxFrame)
		if err := t.writeFrame(frameData, p[:n]); err != nil {
			return written, t.fail(err)
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// CloseWrite ends this side of the tunnel (the app's half-close).
func (t *Conn) CloseWrite() error {
	if nt := t.next.Load(); nt != nil {
		return nt.CloseWrite()
	}
	if t.sentEOF.Load() {
		return nil
	}
	if err := t.writeFrame(frameEOF, nil); err != nil {
		return t.fail(err)
	}
	t.sentEOF.Store(true)
	return nil
}

func (t *Conn) writeFrame(typ byte, p []byte) error {
	t.wmu.Lock()
	if nt := t.next.Load(); nt != nil {
		// Replayed while this write waited for the lock: everything
		// written before is in the replay, the rest goes after it.
		t.wmu.Unlock()
		if typ == frameEOF {
			return nt.CloseWrite()
		}
		_, err := nt.Write(p)
		return err
	}
	defer t.wmu.Unlock()
	if t.copyOK && (typ == frameData || typ == frameEOF) {
		return t.writeKept(typ, p)
	}
	return t.writeFrameLocked(typ, p)
}

func (t *Conn) writeFrameLocked(typ byte, p []byte) error {
	hdr := [frameHeader]byte{typ, byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p))}
	if len(p) > 0 && len(p) <= pump.TLSMaxPlaintext-frameHeader {
		// A small frame goes out as one TLS record, header included: one
		// seal here and one open there instead of two (a request or
		// response of a few KiB is the common case).
		bp := pump.GetBuffer()
		b := append(append((*bp)[:0], hdr[:]...), p...)
		_, err := t.tc.Write(b)
		pump.PutBuffer(bp)
		return err
	}
	if t.vw != nil {
		bufs := net.Buffers{hdr[:], p}
		_, err := t.vw.WriteBuffers(&bufs)
		return err
	}
	if t.batch != nil {
		t.batch.Begin()
	}
	_, err := t.tc.Write(hdr[:])
	if err == nil && len(p) > 0 {
		_, err = t.tc.Write(p)
	}
	if t.batch != nil {
		if ferr := t.batch.Flush(); err == nil {
			err = ferr
		}
	}
	return err
}

// resetTimeout bounds the RESET frame's write: a peer that stopped reading
// must not hold an abort.
const resetTimeout = time.Second

// Abort aborts the tunnel (pump.Aborter): a RESET frame when no frame is being written
// (the writer may be stuck on a peer that stopped reading), else a TCP
// reset of the whole session. Either way the peer's app sees a reset, and
// the session is not reused (Close then closes it).
func (t *Conn) Abort() {
	t.smu.Lock()
	t.aborted = true
	nt := t.next.Load()
	t.smu.Unlock()
	if nt != nil {
		nt.Abort()
		return
	}
	t.broken.Store(true)
	if !t.closed.Load() && t.wmu.TryLock() {
		_ = t.tc.SetWriteDeadline(time.Now().Add(resetTimeout))
		err := t.writeFrameLocked(frameReset, nil)
		t.wmu.Unlock()
		if err == nil {
			return
		}
	}
	if tcp := pump.TCPOf(t.tc); tcp != nil {
		_ = tcp.SetLinger(0)
		tcp.Close()
	}
}

// Close hands the session back (clean) or closes it.
func (t *Conn) Close() error {
	if !t.closed.CompareAndSwap(false, true) {
		return nil
	}
	t.smu.Lock()
	repl := t.repl
	t.smu.Unlock()
	if repl != nil {
		return repl.Close()
	}
	t.releaseOnce(t.clean())
	return nil
}

func (t *Conn) releaseOnce(clean bool) {
	if t.released.CompareAndSwap(false, true) {
		t.release(clean)
	}
}

func (t *Conn) clean() bool {
	return t.gotEOF.Load() && t.sentEOF.Load() && !t.broken.Load() && t.remaining == 0
}

// NetConn is the session, for pump.TCPOf (linger on a reset, which breaks
// the session anyway). The pump's read waiter and batching stop at a
// Conn (a pump.Framed).
func (t *Conn) NetConn() net.Conn { return t.session() }

// session is the TLS session carrying the connection now: the replay's
// after a GOAWAY.
func (t *Conn) session() Session {
	if nt := t.next.Load(); nt != nil {
		return nt.session()
	}
	return t.tc
}

func (t *Conn) LocalAddr() net.Addr                { return t.session().LocalAddr() }
func (t *Conn) RemoteAddr() net.Addr               { return t.session().RemoteAddr() }
func (t *Conn) SetDeadline(d time.Time) error      { return t.session().SetDeadline(d) }
func (t *Conn) SetReadDeadline(d time.Time) error  { return t.session().SetReadDeadline(d) }
func (t *Conn) SetWriteDeadline(d time.Time) error { return t.session().SetWriteDeadline(d) }

// ReadOpen reads the client's OPEN for the next tunnel. io.EOF (or a
// close_notify) means the client closed an idle session: not an error.
func ReadOpen(tc Session) error {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(tc, hdr[:]); err != nil {
		return err // io.EOF only when nothing of a header came
	}
	if hdr != ([frameHeader]byte{frameOpen}) {
		return fmt.Errorf("tunnel: expected OPEN, got frame type %d", hdr[0])
	}
	return nil
}

// WriteOpen starts a tunnel on the client side.
func WriteOpen(t *Conn) error {
	if err := t.writeFrame(frameOpen, nil); err != nil {
		return t.fail(err)
	}
	return nil
}
