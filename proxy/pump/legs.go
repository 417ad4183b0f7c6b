package pump

import "net"

// The pump knows three kinds of leg by their types (*net.TCPConn, *tls.Conn
// over a BatchConn, anything else with Read/Write/CloseWrite), and two by
// what they do, through the interfaces below: a framed leg (a tunnel) that
// carries a stream in frames over a shared session, and a leg with its own
// way to abort. Both are found through NetConn() pass-through wrappers.

// Framed is a source that delivers its stream in frames over a session it
// reads itself. The pump waits on it instead of on the socket (the socket
// carries other frames' bytes too), without holding a copy buffer, and
// releases its buffer whenever a frame is done. The read waiter and the
// write batching stop at a Framed leg: it gathers and batches itself.
type Framed interface {
	// WaitFrame parks until the next frame's payload can be read (or the
	// stream ended or failed: the next Read then says so). It holds no
	// buffer of the pump's while it waits.
	WaitFrame()
	// FrameRemaining is the payload of the current frame not yet read.
	FrameRemaining() int
}

// Aborter is a leg that aborts its own way instead of by a TCP reset of
// the socket under it (a tunnel sends a RESET frame, so that the session's
// other tunnels' peer sees this connection reset, not the whole session).
// The pump calls Abort before Close when it ends a connection on an error.
type Aborter interface {
	Abort()
}

// KernelTLS is a leg whose TLS records the kernel seals and opens (a
// *ktls.Conn): its socket is spliced like a plain one, both ways. splice
// out of it stops at a record that is not application data (EINVAL) and at
// the socket's end; the leg's own Read then takes that record (skips a
// ticket, says io.EOF at close_notify, an error at a FIN without one) and
// splicing resumes. The socket must never be read directly otherwise.
type KernelTLS interface {
	net.Conn
	// TCPConn is the kernel TLS socket.
	TCPConn() *net.TCPConn
}

// framedOf returns the Framed leg under c, or nil.
func framedOf(c any) Framed { return under[Framed](c) }

// kernelTLSOf returns the KernelTLS leg under c, or nil. A framed leg over
// a kernel TLS session (a tunnel) is not one: its socket carries frames
// and other connections' bytes, never this stream as it is.
func kernelTLSOf(c any) KernelTLS {
	if framedOf(c) != nil {
		return nil
	}
	return under[KernelTLS](c)
}

// FrameSplicer is a framed leg (a tunnel) over a kernel TLS session that
// moves its DATA payloads with splice(2) itself: the pump hands it the
// other leg's socket instead of copying through buffers.
type FrameSplicer interface {
	// SpliceFrames reports whether this leg splices now (its session is
	// in the kernel); if not, the pump copies through its Read and Write.
	SpliceFrames() bool
	// SpliceTo moves the leg's stream into dst until its EOF (nil error).
	SpliceTo(dst *net.TCPConn) (int64, error)
	// SpliceFrom moves src's stream into the leg until src's EOF (nil
	// error); the pump then half-closes the leg as usual.
	SpliceFrom(src *net.TCPConn) (int64, error)
}

// frameSplicerOf returns the FrameSplicer under c that splices now, or nil.
func frameSplicerOf(c any) FrameSplicer {
	if f := under[FrameSplicer](c); f != nil && f.SpliceFrames() {
		return f
	}
	return nil
}
