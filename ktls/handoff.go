package ktls

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
)

// Error is a failed handoff. Fallback says whether the connection can go
// on with user-space TLS (its *tls.Conn): true for every failure before
// the kernel took over the send direction, so a caller that honours it
// never loses or duplicates a byte. When false the connection must be
// closed (reset).
type Error struct {
	Fallback bool
	Err      error
}

func (e *Error) Error() string {
	if e.Fallback {
		return "ktls: handoff refused (user-space TLS goes on): " + e.Err.Error()
	}
	return "ktls: handoff failed half-way (the connection is unusable): " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// CanFallBack reports whether err, from Enable, leaves the *tls.Conn usable.
func CanFallBack(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Fallback
}

// Handoff carries one TCP connection from a crypto/tls handshake to kernel
// TLS. Build the *tls.Conn with Client or Server (never share a Handoff
// between connections), run the handshake, then call Enable to move the
// connection into the kernel, or Abandon to stay in user space.
//
// What it arranges so that the kernel starts exactly where crypto/tls
// stopped: the handshake reads one record at a time (the cork), the
// connection's own key log captures its traffic secrets, and the server
// counts the session tickets it sent under its traffic key (each took a
// record sequence number); by default it sends none.
type Handoff struct {
	tcp      *net.TCPConn
	cork     *cork
	keys     secrets
	isClient bool
	tickets  atomic.Uint64 // tickets sent (server): TX records before the handoff
	used     atomic.Bool

	// AllowTickets lets the server send a session ticket (only useful to
	// a peer that stays in user space: a kTLS client discards it). Set it
	// before Server. The config is cloned per connection, so tickets
	// resume across connections only if the base config shares its ticket
	// keys (SetSessionTicketKeys, or WrapSession/UnwrapSession using the
	// base config as mtls does).
	AllowTickets bool

	// mangle, for tests, rewrites a crypto_info before setsockopt.
	mangle func(dir int, info []byte) []byte
}

// NewHandoff prepares tcp for a handoff. The handshake reads and writes
// through under, a pass-through wrapper of tcp that must not buffer reads,
// or tcp itself when under is nil.
func NewHandoff(tcp *net.TCPConn, under net.Conn) *Handoff {
	if under == nil {
		under = tcp
	}
	return &Handoff{tcp: tcp, cork: newCork(under)}
}

// Client returns the client side TLS connection to handshake on. cfg is
// cloned; its KeyLogWriter is replaced by this connection's.
func (h *Handoff) Client(cfg *tls.Config) *tls.Conn {
	h.isClient = true
	return tls.Client(h.cork, h.prepare(cfg))
}

// Server returns the server side TLS connection to handshake on. cfg is
// cloned, as is any config its GetConfigForClient returns, each with this
// connection's key log and, unless AllowTickets, SessionTicketsDisabled.
func (h *Handoff) Server(cfg *tls.Config) *tls.Conn {
	c := h.prepare(cfg)
	if inner := cfg.GetConfigForClient; inner != nil {
		c.GetConfigForClient = func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			got, err := inner(hi)
			if got == nil || err != nil {
				return got, err
			}
			return h.prepare(got), nil
		}
	}
	return tls.Server(h.cork, c)
}

func (h *Handoff) prepare(base *tls.Config) *tls.Config {
	c := base.Clone()
	c.KeyLogWriter = &h.keys
	if h.isClient {
		return c
	}
	if !h.AllowTickets {
		c.SessionTicketsDisabled = true
	}
	// A Go server sends at most one ticket, during the handshake, under its
	// application traffic key at sequence 0; WrapSession runs once for each
	// ticket it sends. Counting here keeps the TX sequence exact even when
	// tickets are allowed (a wrong one would reuse an AES-GCM nonce).
	wrap := c.WrapSession
	c.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		var b []byte
		var err error
		if wrap != nil {
			b, err = wrap(cs, ss)
		} else {
			b, err = c.EncryptTicket(cs, ss)
		}
		if err == nil {
			h.tickets.Add(1)
		}
		return b, err
	}
	return c
}

// Abandon keeps the connection in user space: the cork stops limiting
// reads. Call it instead of Enable when the peer did not agree to kTLS.
func (h *Handoff) Abandon() { h.cork.release() }

// Enable hands the connection to the kernel after tc (from Client or
// Server) completed its handshake, before any application byte was read
// or written on tc. On success use the returned Conn and drop tc. On an
// Error with Fallback (see CanFallBack) keep using tc: the cork is
// released. Otherwise close the connection.
func (h *Handoff) Enable(tc *tls.Conn) (*Conn, error) {
	if h.used.Swap(true) {
		return nil, errors.New("ktls: Enable called twice")
	}
	c, err := h.enable(tc)
	if err != nil && CanFallBack(err) {
		h.cork.release()
	}
	h.keys.wipe()
	return c, err
}

func (h *Handoff) enable(tc *tls.Conn) (*Conn, error) {
	refuse := func(format string, args ...any) (*Conn, error) {
		return nil, &Error{Fallback: true, Err: fmt.Errorf(format, args...)}
	}
	st := tc.ConnectionState()
	switch {
	case !st.HandshakeComplete:
		return refuse("handshake not complete")
	case st.Version != tls.VersionTLS13:
		return refuse("TLS version %s, not 1.3", tls.VersionName(st.Version))
	case !h.cork.atBoundary():
		return refuse("handshake ended inside a record")
	}
	s, err := suiteFor(st.CipherSuite)
	if err != nil {
		return refuse("%w", err)
	}
	clientSecret, serverSecret, err := h.keys.get()
	if err != nil {
		return refuse("%w", err)
	}
	txSecret, rxSecret := serverSecret, clientSecret
	var txSeq uint64
	if h.isClient {
		txSecret, rxSecret = clientSecret, serverSecret
	} else {
		txSeq = h.tickets.Load()
	}
	txKey, txIV, err := trafficKeys(s, txSecret)
	if err != nil {
		return refuse("%w", err)
	}
	rxKey, rxIV, err := trafficKeys(s, rxSecret)
	if err != nil {
		return refuse("%w", err)
	}
	// The peer's records start at 0: a Go client sends nothing under its
	// traffic key before its Finished, and records the server sent after
	// its Finished (a ticket) are read by the kernel from sequence 0.
	txInfo := cryptoInfo(s, txKey, txIV, txSeq)
	rxInfo := cryptoInfo(s, rxKey, rxIV, 0)
	defer wipe(txKey, txIV, rxKey, rxIV, txInfo, rxInfo)
	if h.mangle != nil {
		txInfo, rxInfo = h.mangle(tlsTX, txInfo), h.mangle(tlsRX, rxInfo)
	}

	rc, err := h.tcp.SyscallConn()
	if err != nil {
		return refuse("%w", err)
	}
	var herr *Error
	err = control(rc, func(fd int) error {
		if err := setULP(fd); err != nil {
			return &Error{Fallback: true, Err: err}
		}
		// The ULP alone passes bytes through unchanged, so a refused
		// TLS_TX still leaves user-space TLS working.
		if err := setCrypto(fd, tlsTX, txInfo); err != nil {
			return &Error{Fallback: true, Err: err}
		}
		if err := setCrypto(fd, tlsRX, rxInfo); err != nil {
			return &Error{Fallback: false, Err: err}
		}
		// Go never pads TLS 1.3 records; the kernel then decrypts straight
		// into the reader's buffer. Kernels before 6.0 lack the option.
		_ = setNoPad(fd)
		return nil
	})
	if errors.As(err, &herr) {
		return nil, herr
	}
	if err != nil {
		return refuse("%w", err) // the fd was closed: nothing was set
	}
	return newConn(h.tcp, rc, st), nil
}

func wipe(bs ...[]byte) {
	for _, b := range bs {
		clear(b)
	}
}
