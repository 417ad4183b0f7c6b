package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/listener"
	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/ferrymesh/ferry/proxy/pump"
	"github.com/ferrymesh/ferry/proxy/tunnel"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// DefaultHandshakeTimeout bounds an inbound TLS handshake: a slow or silent
// client cannot hold a goroutine and a socket longer than this.
const DefaultHandshakeTimeout = 10 * time.Second

// DefaultFirstByteTimeout bounds the wait for a client's first byte (of the
// ClientHello, or of plain data when permissive). A valid client sends it
// at once; a silent socket is the cheapest way to hold a pending-handshake
// slot, so it is let go well before the handshake timeout.
const DefaultFirstByteTimeout = 3 * time.Second

// MeshAcceptor is the inbound side of the mesh: a mutual-TLS handshake with
// a required client certificate issued by the mesh CA, then the client's
// service (first URI SAN) is authorized by the destination's intentions.
// Plain TCP is refused unless Permissive is set (Consul's permissive
// MutualTLSMode), in which case a client that does not open with a TLS
// ClientHello is passed to the app as it is.
type MeshAcceptor struct {
	Identity   *mtls.Identity
	Intentions *intentions.Watcher
	// Service is the destination service name, for logs.
	Service          string
	HandshakeTimeout time.Duration
	// FirstByteTimeout bounds the wait for the first byte within the
	// handshake timeout; 0 means DefaultFirstByteTimeout.
	FirstByteTimeout time.Duration
	Permissive       bool
	Logger           hclog.Logger
	// Denied counts denied connections by source service and deciding
	// intention; optional.
	Denied *CounterVec
	// Ports maps the original destination of an authorized connection to
	// an app address other than the local app (declared extra ports of a
	// multi-port service); optional.
	Ports func(dst netip.AddrPort) (addr string, ok bool)
	// DisableTunnels stops offering ferry peers tunnel sessions
	// (proxy/tunnel): one mTLS session per connection, as with other peers.
	DisableTunnels bool
	// KTLS is the kernel TLS policy (ktls.go): with Use, a ferry client
	// offering KTLSALPN gets a session in the kernel.
	KTLS KTLS
	// TLSModes counts sessions by mode (NewTLSModeMetric); optional.
	TLSModes *CounterVec

	cfg   *tls.Config
	warns *rateLog
	// maxAge overrides tunnel.ServerMaxAge, and testHookNext runs when a
	// session's tunnel has ended (tests).
	maxAge       time.Duration
	testHookNext func()
}

func (a *MeshAcceptor) sessionMaxAge() time.Duration {
	if a.maxAge > 0 {
		return a.maxAge
	}
	return tunnel.ServerMaxAge
}

// Init prepares the acceptor; call once before use.
func (a *MeshAcceptor) Init() {
	if a.HandshakeTimeout <= 0 {
		a.HandshakeTimeout = DefaultHandshakeTimeout
	}
	a.warns = newRateLog(logInterval, nil)
	if a.Logger == nil {
		a.Logger = hclog.NewNullLogger()
	}
	var protos []string
	if a.KTLS.Use && !a.DisableTunnels {
		protos = append(protos, KTLSTunnelALPN)
	}
	if a.KTLS.Use {
		protos = append(protos, KTLSALPN)
	}
	if !a.DisableTunnels && !a.KTLS.Required {
		protos = append(protos, tunnel.ALPN)
	}
	a.cfg = alpnServerConfig(a.Identity.ServerConfig(), protos)
}

// AcceptInbound implements Acceptor.
func (a *MeshAcceptor) AcceptInbound(ctx context.Context, raw *net.TCPConn) (Accepted, error) {
	src := raw.RemoteAddr().String()
	start := time.Now()
	deadline := start.Add(a.HandshakeTimeout)
	firstBy := a.FirstByteTimeout
	if firstBy <= 0 {
		firstBy = DefaultFirstByteTimeout
	}
	first := start.Add(firstBy)
	if first.After(deadline) {
		first = deadline
	}
	isTLS, err := startsWithTLS(ctx, raw, first)
	if err != nil {
		return Accepted{}, &Refused{Outcome: "handshake_error", Reason: "no data before the first-byte timeout", Err: err}
	}
	if a.Permissive && !isTLS {
		a.Logger.Debug("permissive: plain connection passed to the app", "src", src)
		return Accepted{Conn: raw, Keys: []string{"plain"}}, nil
	}
	// Not TLS and not permissive: the handshake below fails and says why.
	var tc *tls.Conn
	h := newKTLSHandoff(a.KTLS.Use, raw)
	if h != nil {
		// Foreign and user-space clients keep resuming; the handoff counts
		// the ticket it sends, so a kernel session's TX sequence stays exact.
		h.AllowTickets = true
		tc = h.Server(a.cfg)
	} else {
		tc = tls.Server(pump.NewBatchConn(raw), a.cfg)
	}
	hctx, cancel := context.WithDeadline(ctx, deadline)
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		if ok, n := a.warns.allow("handshake"); ok {
			a.Logger.Info("inbound handshake failed", "src", src, "error", err, "suppressed_since_last", n)
		}
		return Accepted{}, &Refused{Outcome: "handshake_error", Reason: "tls handshake", Err: err}
	}
	id, err := mtls.PeerID(tc.ConnectionState())
	if err != nil {
		if ok, n := a.warns.allow("no-identity"); ok {
			a.Logger.Warn("inbound client has no service identity", "src", src, "error", err, "suppressed_since_last", n)
		}
		return Accepted{Conn: tc}, &Refused{Outcome: "denied", Reason: "no service SPIFFE ID", Err: err}
	}
	conn, mode, err := handOff(h, tc)
	if conn == nil {
		// Half in the kernel: no TLS layer can close it cleanly. Reset.
		return Accepted{}, &Refused{Outcome: "handshake_error", Reason: "kernel TLS handoff", Err: err, Reset: true}
	}
	if err != nil {
		a.Logger.Debug("kernel TLS handoff refused: user-space TLS", "src", src, "error", err)
	}
	if a.TLSModes != nil {
		a.TLSModes.With("inbound", mode).Inc()
	}
	if err := requireKernel(a.KTLS, mode); err != nil {
		if ok, n := a.warns.allow("ktls-required"); ok {
			a.Logger.Warn("inbound session refused", "src", src, "peer", id.String(), "error", err, "suppressed_since_last", n)
		}
		return Accepted{Conn: conn}, &Refused{Outcome: "handshake_error", Reason: "kernel TLS required", Err: err}
	}
	// conn is the kernel session, or tc (user space, or after a refused
	// handoff): a tunnel session runs the same over either.
	if sess, ok := conn.(tunnel.Session); ok && tunnelALPN(tc.ConnectionState().NegotiatedProtocol) {
		ss := &inboundSession{a: a, raw: raw, tc: sess, id: id, src: src, created: time.Now(),
			gen: a.Identity.Generation(), released: make(chan bool, 1)}
		_ = sess.SetReadDeadline(deadline)
		stop := expireOnDone(ctx, sess)
		err := tunnel.ReadOpen(sess)
		stop()
		_ = sess.SetReadDeadline(time.Time{})
		if err != nil {
			return Accepted{Conn: sess}, &Refused{Outcome: "handshake_error", Reason: "no tunnel OPEN before the handshake timeout", Err: err}
		}
		return a.admit(raw, tunnel.NewConn(sess, ss.release), id, src, ss.next)
	}
	return a.admit(raw, conn, id, src, nil)
}

// admit decides one connection (or one tunnel of a session) by the
// intentions and returns what to pump.
func (a *MeshAcceptor) admit(raw *net.TCPConn, conn net.Conn, id mtls.SpiffeID, src string,
	next func(context.Context) (Accepted, error)) (Accepted, error) {
	source := intentions.Source{Name: id.Service, Namespace: id.Namespace, Partition: id.Partition}
	// A revocation closes the socket under the pump (the fastest way to
	// stop both directions) and leaves a mark, so the connection is counted
	// as revoked instead of failing with a read error.
	revoked := new(atomic.Bool)
	d, done := a.Intentions.Admit(source, func() { revoked.Store(true); raw.Close() })
	if !d.Allow {
		if ok, n := a.warns.allow("deny|" + id.String() + "|" + d.Intention); ok {
			a.Logger.Warn("inbound connection denied by intentions", "src", src, "source", id.Service,
				"destination", a.Service, "rule", intentionLabel(d), "intention", d.Intention, "reason", d.Reason,
				"suppressed_since_last", n)
		}
		if a.Denied != nil {
			a.Denied.With(id.Service, a.Service, intentionLabel(d)).Inc()
		}
		return Accepted{Conn: conn}, &Refused{Outcome: "denied", Reason: fmt.Sprintf("intentions: %s", d.Reason)}
	}
	a.Logger.Debug("inbound connection authorized", "src", src, "peer", id.String(), "intention", d.Intention)
	acc := Accepted{Conn: conn, Peer: id.String(), Keys: []string{"source:" + id.Service}, Done: done, Revoked: revoked.Load, Next: next}
	if a.Ports != nil {
		if dst, err := listener.OriginalDst(raw); err == nil {
			if addr, ok := a.Ports(dst); ok {
				acc.Dial = func(ctx context.Context) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "tcp", addr)
				}
			}
		}
	}
	return acc, nil
}

// inboundSession is a ferry peer's tunnel session (proxy/tunnel): after one
// tunnel ends cleanly, the next may follow on the same mTLS session.
type inboundSession struct {
	a        *MeshAcceptor
	raw      *net.TCPConn
	tc       tunnel.Session // user-space or kernel TLS
	id       mtls.SpiffeID
	src      string
	created  time.Time
	gen      uint64    // identity generation the peer was last verified under
	released chan bool // the last tunnel's Close: clean or not
}

// release is the tunnels' Close: a broken tunnel ends the session.
func (s *inboundSession) release(clean bool) {
	if !clean {
		s.tc.Close()
	}
	s.released <- clean
}

var errSessionOver = errors.New("tunnel session over")

// next waits for the client's next tunnel on the session (Accepted.Next).
func (s *inboundSession) next(ctx context.Context) (Accepted, error) {
	if clean := <-s.released; !clean {
		return Accepted{}, errSessionOver // release closed it
	}
	if s.a.testHookNext != nil {
		s.a.testHookNext()
	}
	// From here on the client may already be sending its next OPEN: a
	// session ended now ends with GOAWAY, so that the client starts that
	// connection again elsewhere instead of failing it (audit F14).
	if time.Since(s.created) >= s.a.sessionMaxAge() {
		tunnel.GoAway(s.tc, tunnel.GoAwayLinger)
		return Accepted{}, fmt.Errorf("%w: older than %v", errSessionOver, s.a.sessionMaxAge())
	}
	// Leaves or roots changed since the peer was verified: verify its chain
	// again against the roots of now before it opens anything more.
	if g := s.a.Identity.Generation(); g != s.gen {
		if err := s.a.cfg.VerifyConnection(s.tc.ConnectionState()); err != nil {
			tunnel.GoAway(s.tc, tunnel.GoAwayLinger)
			return Accepted{}, &Refused{Outcome: "handshake_error", Reason: "peer no longer verifies", Err: err}
		}
		s.gen = g
	}
	_ = s.tc.SetReadDeadline(time.Now().Add(tunnel.ServerIdle))
	stop := expireOnDone(ctx, s.tc)
	err := tunnel.ReadOpen(s.tc)
	stop() // the drain's expired deadline cannot land after the reset below
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Idle too long, or draining: an OPEN may be crossing.
			tunnel.GoAway(s.tc, tunnel.GoAwayLinger)
		} else {
			s.tc.Close()
		}
		return Accepted{}, fmt.Errorf("%w: %w", errSessionOver, err)
	}
	_ = s.tc.SetReadDeadline(time.Time{})
	return s.a.admit(s.raw, tunnel.NewConn(s.tc, s.release), s.id, s.src, s.next)
}

// aLongTimeAgo is a read deadline that has passed: a blocked read returns
// at once.
var aLongTimeAgo = time.Unix(1, 0)

// expireOnDone makes c's reads fail once ctx is done (by an expired read
// deadline) until the returned stop is called. stop waits for a callback
// that already started, so that a deadline the caller sets after stop is
// not overwritten by a late expired one (context.AfterFunc's own stop does
// not wait).
func expireOnDone(ctx context.Context, c interface{ SetReadDeadline(time.Time) error }) (stop func()) {
	fired := make(chan struct{})
	stopFn := context.AfterFunc(ctx, func() {
		defer close(fired)
		_ = c.SetReadDeadline(aLongTimeAgo)
	})
	return func() {
		if !stopFn() {
			<-fired
		}
	}
}

// startsWithTLS peeks (without consuming) at the first byte: a TLS record of
// type handshake (22) opens every ClientHello. Peeking keeps the socket a
// plain *net.TCPConn, so a permissive plain connection still splices. It
// gives up at deadline or when ctx is done (a hard shutdown must not wait
// for silent clients).
func startsWithTLS(ctx context.Context, c *net.TCPConn, deadline time.Time) (bool, error) {
	if err := c.SetReadDeadline(deadline); err != nil {
		return false, err
	}
	defer c.SetReadDeadline(time.Time{})
	stop := expireOnDone(ctx, c)
	defer stop()
	rc, err := c.SyscallConn()
	if err != nil {
		return false, err
	}
	var b [1]byte
	var n int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK)
		return !errors.Is(rerr, unix.EAGAIN)
	})
	if err != nil {
		return false, err
	}
	if rerr != nil {
		return false, rerr
	}
	if n == 0 {
		return false, errors.New("connection closed before any data")
	}
	return b[0] == 22, nil
}

// intentionLabel names the deciding intention for the denied metric by
// what it matches and does, never by its ID: labels stay within the
// service names and actions of this destination's intentions.
func intentionLabel(d intentions.Decision) string {
	if d.Intention == "" {
		return "default"
	}
	// intentions.Describe: "<src> => <dst> (ID: <id>, Precedence: <n>, Action: <A>)".
	head, attrs, ok := strings.Cut(d.Intention, " (")
	if !ok {
		return d.Intention
	}
	var kept []string
	for _, a := range strings.Split(strings.TrimSuffix(attrs, ")"), ", ") {
		if !strings.HasPrefix(a, "ID: ") && !strings.HasPrefix(a, "Precedence: ") {
			kept = append(kept, a)
		}
	}
	return head + " (" + strings.Join(kept, ", ") + ")"
}

// deniedSeriesMax caps the denied metric's label sets: a peer holding many
// identities (or intentions churning) must not grow /metrics without bound.
const deniedSeriesMax = 1024

// NewDeniedMetric is the counter MeshAcceptor.Denied expects.
func NewDeniedMetric() *CounterVec {
	c := NewCounterVec("ferry_intentions_denied_total",
		"Inbound connections closed after the handshake because intentions deny their source.",
		"source", "destination", "intention")
	c.f.maxSeries = deniedSeriesMax
	return c
}
