package ktls

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// TLS alert descriptions ferry acts on (RFC 8446 6).
const (
	alertCloseNotify       = 0
	alertUnexpectedMessage = 10
	alertUserCanceled      = 90
	alertLevelWarning      = 1
	alertLevelFatal        = 2
)

// Handshake message types seen after the handshake (RFC 8446 4).
const (
	msgNewSessionTicket = 4
	msgKeyUpdate        = 24
)

var (
	// ErrTruncated: the peer's stream ended in a FIN without close_notify
	// (crypto/tls calls that io.EOF; ferry treats it as an abort).
	ErrTruncated = fmt.Errorf("ktls: stream ended without close_notify: %w", io.ErrUnexpectedEOF)
	// ErrKeyUpdate: the peer updated its traffic key. Kernels before 6.14
	// cannot follow, and ferry peers never send one.
	ErrKeyUpdate = errors.New("ktls: peer sent KeyUpdate (kernel TLS cannot rekey)")
	errClosed    = errors.New("ktls: write after close_notify")
)

// AlertError is a TLS alert the peer sent (other than close_notify and
// user_canceled). It comes wrapped in a *net.OpError with Op "remote
// error", as crypto/tls reports it.
type AlertError uint8

func (a AlertError) Error() string { return fmt.Sprintf("tls: alert(%d)", uint8(a)) }

// Conn is a TLS 1.3 connection whose records the kernel seals and opens.
// Read and Write move plaintext through the socket; WriteTo and ReadFrom
// splice between it and another *net.TCPConn without user-space copies.
// Records other than application data (alerts, post-handshake messages)
// are read here with recvmsg: close_notify ends the stream with io.EOF,
// session tickets are skipped, anything else is an error.
type Conn struct {
	tcp   *net.TCPConn
	rc    syscall.RawConn
	state tls.ConnectionState

	readMu  sync.Mutex
	readErr error  // sticky: io.EOF after close_notify, or the fatal error
	pending []byte // application data read on the control path
	hsBuf   []byte // partial post-handshake message

	closeNotifySent atomic.Bool
	closeOnce       sync.Once
	closeErr        error
}

func newConn(tcp *net.TCPConn, rc syscall.RawConn, st tls.ConnectionState) *Conn {
	return &Conn{tcp: tcp, rc: rc, state: st}
}

// ConnectionState returns the handshake's state (peer certificates, ALPN).
func (c *Conn) ConnectionState() tls.ConnectionState { return c.state }

// NetConn returns the TCP connection (for linger, TCP_INFO, splice).
func (c *Conn) NetConn() net.Conn { return c.tcp }

// TCPConn returns the kTLS socket.
func (c *Conn) TCPConn() *net.TCPConn { return c.tcp }

func (c *Conn) LocalAddr() net.Addr                { return c.tcp.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr               { return c.tcp.RemoteAddr() }
func (c *Conn) SetDeadline(t time.Time) error      { return c.tcp.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.tcp.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.tcp.SetWriteDeadline(t) }

func (c *Conn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if len(c.pending) > 0 {
			n := copy(p, c.pending)
			c.pending = c.pending[n:]
			return n, nil
		}
		if c.readErr != nil {
			return 0, c.readErr
		}
		if len(p) == 0 {
			return 0, nil
		}
		n, err := c.tcp.Read(p)
		switch {
		case n > 0:
			return n, nil
		case err == io.EOF:
			c.readErr = ErrTruncated
		case isControlErr(err):
			// read(2) returns EIO when the next record is not data.
			if err := c.readControl(); err != nil {
				if isTimeout(err) {
					return 0, err
				}
				c.readErr = err
			}
		case err != nil:
			return 0, err // deadlines and resets are not sticky here
		}
	}
}

// isControlErr reports whether a read or splice error means a record
// other than application data is next: read(2) says EIO, splice(2)
// EINVAL (net falls back from a first-call EINVAL to read, hence EIO).
func isControlErr(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, syscall.EINVAL)
}

// isTimeout: a deadline passed; the stream itself is fine.
func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// maxPlaintext is a TLS record's largest plaintext (RFC 8446 5.1).
const maxPlaintext = 1 << 14

// readControl reads the next record with recvmsg and its record type.
// It returns nil to go on reading (a ticket, user_canceled, application
// data now in c.pending), io.EOF on close_notify, or the connection's
// fatal error.
func (c *Conn) readControl() error {
	buf := make([]byte, maxPlaintext+1)
	oob := make([]byte, unix.CmsgSpace(1))
	var n, oobn int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, 0)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("ktls: recvmsg: %w", err)
	}
	if n == 0 && oobn == 0 {
		return ErrTruncated
	}
	typ, err := recordTypeOf(oob[:oobn])
	if err != nil {
		return fmt.Errorf("ktls: %w", err)
	}
	body := buf[:n]
	switch typ {
	case recordApplicationData:
		c.pending = body
		return nil
	case recordAlert:
		if len(body) != 2 {
			return fmt.Errorf("ktls: malformed alert record (%d bytes)", len(body))
		}
		switch body[1] {
		case alertCloseNotify:
			return io.EOF
		case alertUserCanceled:
			return nil // RFC 8446 6.1: close_notify should follow
		}
		return &net.OpError{Op: "remote error", Net: "tcp", Source: c.tcp.LocalAddr(), Addr: c.tcp.RemoteAddr(), Err: AlertError(body[1])}
	case recordHandshake:
		return c.handshakeMessages(body)
	}
	c.sendAlert(alertUnexpectedMessage)
	return fmt.Errorf("ktls: unexpected record type %d after the handshake", typ)
}

// handshakeMessages handles post-handshake messages (RFC 8446 4.6) and
// tells the peer why when it fails the connection.
func (c *Conn) handshakeMessages(body []byte) error {
	var err error
	c.hsBuf, err = postHandshake(c.hsBuf, body)
	if err != nil {
		c.sendAlert(alertUnexpectedMessage)
	}
	return err
}

// maxPostHandshakeMsg bounds a buffered post-handshake message (a ticket
// is a few hundred bytes).
const maxPostHandshakeMsg = 1 << 16

// postHandshake appends a handshake record's body to the partial message
// in buf (messages may span records) and consumes the whole messages: a
// NewSessionTicket is dropped (ferry does not resume kTLS sessions), a
// KeyUpdate is ErrKeyUpdate, anything else a protocol error. It returns
// what is left of an incomplete message.
func postHandshake(buf, body []byte) ([]byte, error) {
	buf = append(buf, body...)
	for len(buf) > 0 {
		switch typ := buf[0]; {
		case typ == msgKeyUpdate:
			return nil, ErrKeyUpdate
		case typ != msgNewSessionTicket:
			return nil, fmt.Errorf("ktls: unexpected handshake message %d after the handshake", typ)
		case len(buf) < 4:
			return buf, nil
		}
		n := int(buf[1])<<16 | int(buf[2])<<8 | int(buf[3])
		switch {
		case n > maxPostHandshakeMsg:
			return nil, fmt.Errorf("ktls: post-handshake message of %d bytes", n)
		case len(buf) < 4+n:
			return buf, nil // the rest comes in the next record
		}
		buf = buf[4+n:]
	}
	return nil, nil
}

func (c *Conn) Write(p []byte) (int, error) {
	if c.closeNotifySent.Load() {
		return 0, errClosed
	}
	return c.tcp.Write(p)
}

// Buffered is the application data this Conn holds in user space (read
// with a control record) that the socket no longer has: a caller that
// splices the socket must read these through Read first.
func (c *Conn) Buffered() int {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	return len(c.pending)
}

// WriteBuffers writes b in one writev(2) (net.Buffers consumes what it
// wrote): the kernel fills its records across the buffers, so a small
// header before a large payload costs no record of its own.
func (c *Conn) WriteBuffers(b *net.Buffers) (int64, error) {
	if c.closeNotifySent.Load() {
		return 0, errClosed
	}
	return b.WriteTo(c.tcp)
}

// sendRecord writes one record of type typ (not application data).
func (c *Conn) sendRecord(typ byte, body []byte) error {
	oob := recordTypeCmsg(typ)
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		werr = unix.Sendmsg(int(fd), body, oob, nil, 0)
		return werr != unix.EAGAIN
	})
	if err == nil {
		err = werr
	}
	if err != nil {
		return fmt.Errorf("ktls: send record type %d: %w", typ, err)
	}
	return nil
}

// sendAlert tells the peer why the connection ends, best effort (the
// caller is about to fail the connection anyway).
func (c *Conn) sendAlert(desc byte) {
	if c.closeNotifySent.Swap(true) {
		return
	}
	_ = c.tcp.SetWriteDeadline(time.Now().Add(time.Second))
	_ = c.sendRecord(recordAlert, []byte{alertLevelFatal, desc})
}

// closeNotify sends close_notify once.
func (c *Conn) closeNotify() error {
	if c.closeNotifySent.Swap(true) {
		return nil
	}
	return c.sendRecord(recordAlert, []byte{alertLevelWarning, alertCloseNotify})
}

// CloseWrite sends close_notify, then a FIN: the peer reads a clean end
// of stream, and the other direction goes on.
func (c *Conn) CloseWrite() error {
	err := c.closeNotify()
	if ferr := c.tcp.CloseWrite(); err == nil {
		err = ferr
	}
	return err
}

// Close sends close_notify (unless sent, or the socket is already closed
// under it to reset the connection) and closes the socket.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		// Like crypto/tls: a peer that stops reading cannot hold Close.
		_ = c.tcp.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_ = c.closeNotify()
		c.closeErr = c.tcp.Close()
	})
	return c.closeErr
}

// WriteTo copies the plaintext stream to w until close_notify; when w is
// a *net.TCPConn the kernel splices it (zero copies in ferry). It returns
// nil at close_notify and ErrTruncated at a FIN without one.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	var total int64
	for {
		if len(c.pending) > 0 {
			n, err := w.Write(c.pending)
			total += int64(n)
			c.pending = c.pending[n:]
			if err != nil {
				return total, err
			}
		}
		if c.readErr != nil {
			if c.readErr == io.EOF {
				return total, nil
			}
			return total, c.readErr
		}
		var n int64
		var err error
		if tw, ok := w.(*net.TCPConn); ok {
			n, err = tw.ReadFrom(c.tcp) // splice(2)
		} else {
			n, err = io.Copy(w, readerOnly{c.tcp})
		}
		total += n
		switch {
		case err == nil:
			c.readErr = ErrTruncated // the socket's EOF: a FIN, no close_notify
		case isControlErr(err):
			if err := c.readControl(); err != nil {
				if isTimeout(err) {
					return total, err
				}
				c.readErr = err
			}
		default:
			return total, err
		}
	}
}

// ReadFrom copies r to the peer until r's EOF; when r is a *net.TCPConn
// the kernel splices it into the TLS socket.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if c.closeNotifySent.Load() {
		return 0, errClosed
	}
	return c.tcp.ReadFrom(r)
}

// readerOnly hides a reader's WriterTo, so io.Copy reads with read(2).
type readerOnly struct{ io.Reader }

// sequences returns the kernel's next record sequence numbers (TX, RX).
func (c *Conn) sequences() (tx, rx uint64, err error) {
	err = control(c.rc, func(fd int) error {
		for _, d := range []struct {
			dir int
			seq *uint64
		}{{tlsTX, &tx}, {tlsRX, &rx}} {
			info, err := getCrypto(fd, d.dir)
			if err != nil {
				return err
			}
			if *d.seq, err = cryptoInfoSeq(info); err != nil {
				return err
			}
		}
		return nil
	})
	return tx, rx, err
}
