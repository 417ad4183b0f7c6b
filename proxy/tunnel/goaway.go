package tunnel

import (
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

// A pooled session can be picked by the client just as the server ends it
// (audit F14): the client's OPEN and first bytes are already on their way
// when the session dies, and the app's connection, accepted a moment ago,
// would fail although its peer never saw it. Drains make this common: a
// rollout ends every idle session of the pods going away.
//
// So the server never just closes a session between tunnels: it sends
// GOAWAY, which says "no OPEN on this session was or will be taken", then
// close_notify and a FIN, and discards what still comes until the client
// closes (GoAway). The client keeps a copy of what it writes on a tunnel
// until the server's first frame shows the tunnel was taken; if that first
// frame is GOAWAY, it starts the same connection on a fresh session (the
// route's dial: another instance when this one is draining) and replays the
// copy there. The app sees nothing. Never replayed: a tunnel the server
// took (its first frame was anything else), and one whose copy outgrew
// replayMax before the server answered; those end with a reset, as before.

// replayMax bounds the copy kept per tunnel until the server's first
// frame: a request, not an upload. Past it the tunnel cannot be replayed.
const replayMax = 64 << 10

// errGoneAway ends a tunnel that the server turned away and that cannot be
// replayed; the app sees a reset, as on a refused connection.
var errGoneAway = fmt.Errorf("tunnel: the peer ended the session before taking the connection (GOAWAY): %w", syscall.ECONNRESET)

// errResumed tells the reading side that the connection now continues on
// the replay's tunnel (Conn.next).
var errResumed = errors.New("tunnel: resumed on a new session")

// replay is a client Conn's state for answering a GOAWAY.
type replay struct {
	// redial makes the replacement connection (a fresh session's tunnel,
	// OPEN already sent, possibly wrapped); nil: no replay.
	redial func() (net.Conn, error)
	// accepted: the peer's first frame came, so it took the tunnel.
	accepted atomic.Bool

	// Under Conn.wmu: what was written since OPEN while not accepted;
	// copyOK while it holds all of it; writeDead once a write failed
	// before acceptance (the bytes are in the copy, the session is gone).
	kept            []byte
	copyOK, copyEOF bool
	writeDead       bool
	smu             sync.Mutex // next and repl against Close and Abort
	aborted         bool       // under smu
	next            atomic.Pointer[Conn]
	repl            net.Conn // what redial returned: closed by Close
}

// NewClientConn is NewConn for the client side, able to replay the
// connection on a new tunnel from redial when the server answers its OPEN
// with GOAWAY.
func NewClientConn(tc Session, release func(clean bool), redial func() (net.Conn, error)) *Conn {
	t := NewConn(tc, release)
	t.redial = redial
	t.copyOK = redial != nil
	return t
}

// writeKept writes a DATA or EOF frame of a tunnel that may still be
// replayed (t.wmu held): the bytes join the copy until the peer has taken
// the tunnel. A write that fails before then is not an error yet: the
// copy holds the bytes, and the peer's GOAWAY (replay) or anything else
// (the reading side fails, the pump resets the app) settles it.
func (t *Conn) writeKept(typ byte, p []byte) error {
	if t.accepted.Load() {
		t.kept, t.copyOK = nil, false
		if t.writeDead {
			return errTunnelBroken // a write the copy covered was lost
		}
		return t.writeFrameLocked(typ, p)
	}
	if typ == frameEOF {
		t.copyEOF = true
	} else if len(t.kept)+len(p) > replayMax {
		t.kept, t.copyOK = nil, false
	} else {
		t.kept = append(t.kept, p...)
	}
	if t.writeDead {
		if t.copyOK {
			return nil
		}
		return errTunnelBroken
	}
	err := t.writeFrameLocked(typ, p)
	if err != nil && t.copyOK {
		t.writeDead = true
		return nil
	}
	if t.accepted.Load() {
		t.kept, t.copyOK = nil, false // dropKept found the lock taken
	}
	return err
}

// dropKept lets the copy go once the peer took the tunnel (the reading
// side calls it), so that a connection that wrote its request and then
// only reads does not hold it for its whole life. When the writing side
// holds the lock, it drops the copy itself after its write.
func (t *Conn) dropKept() {
	if t.redial != nil && t.wmu.TryLock() {
		if !t.writeDead {
			t.kept, t.copyOK = nil, false
		}
		t.wmu.Unlock()
	}
}

// resume answers a GOAWAY that came before the peer took the tunnel (the
// reading side calls it): the old session is closed, the connection is
// dialed again and the copy replayed there; errResumed says reads and
// writes now go to t.next.
func (t *Conn) resume() error {
	t.broken.Store(true) // the old session is over whatever happens
	if t.redial == nil {
		return t.fail(errGoneAway)
	}
	t.releaseOnce(false) // closes the old session: the server stops waiting
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if !t.copyOK {
		return t.fail(errGoneAway)
	}
	c, err := t.redial()
	var nt *Conn
	if err == nil {
		if nt = tunnelUnder(c); nt == nil {
			c.Close()
			err = errors.New("the new connection is not a tunnel")
		}
	}
	if err != nil {
		return t.fail(fmt.Errorf("%w; replay: %w", errGoneAway, err))
	}
	t.smu.Lock()
	if t.closed.Load() || t.aborted {
		t.smu.Unlock()
		nt.Abort()
		c.Close()
		return t.fail(errGoneAway)
	}
	t.repl = c
	t.next.Store(nt)
	t.smu.Unlock()
	// t.wmu is still held: the writing side's next frame goes after these.
	if len(t.kept) > 0 {
		if _, err := nt.Write(t.kept); err != nil {
			return err
		}
	}
	if t.copyEOF {
		if err := nt.CloseWrite(); err != nil {
			return err
		}
	}
	t.kept = nil
	return errResumed
}

// tunnelUnder finds the *Conn under c's NetConn() wrappers (the catalog
// tracks its connections in one).
func tunnelUnder(c net.Conn) *Conn {
	for c != nil {
		if t, ok := c.(*Conn); ok {
			return t
		}
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return nil
		}
		c = w.NetConn()
	}
	return nil
}

// GoAwayLinger bounds how long GoAway waits for the client to close.
const GoAwayLinger = time.Second

// GoAway ends a session between tunnels on the server side: GOAWAY, then
// close_notify and a FIN, then what the client still sends (an OPEN that
// crossed the GOAWAY, its first bytes) is read and dropped until the
// client closes or linger passes. Closing at once instead would answer
// those bytes with a TCP reset, which can destroy the GOAWAY before the
// client reads it.
func GoAway(tc Session, linger time.Duration) {
	defer tc.Close()
	_ = tc.SetWriteDeadline(time.Now().Add(resetTimeout))
	if _, err := tc.Write([]byte{frameGoAway, 0, 0, 0}); err != nil {
		return
	}
	_ = tc.CloseWrite()
	tcp := pump.TCPOf(tc)
	if tcp == nil {
		return
	}
	_ = tcp.CloseWrite()
	_ = tcp.SetReadDeadline(time.Now().Add(linger))
	if _, kernel := tc.(vectorWriter); kernel {
		// The kernel opens the records: read through the session, which
		// takes the client's close_notify (a control record that read(2)
		// on the socket stops at with EIO) and stops at its end.
		_, _ = io.Copy(io.Discard, tc)
		return
	}
	_, _ = io.Copy(io.Discard, tcp)
}
