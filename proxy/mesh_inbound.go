package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/listener"
	"github.com/ferrymesh/ferry/mtls"
	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// DefaultHandshakeTimeout bounds an inbound TLS handshake: a slow or silent
// client cannot hold a goroutine and a socket longer than this.
const DefaultHandshakeTimeout = 10 * time.Second

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
	Permissive       bool
	Logger           hclog.Logger
	// Denied counts denied connections by source service and deciding
	// intention; optional.
	Denied *CounterVec
	// Ports maps the original destination of an authorized connection to
	// an app address other than the local app (declared extra ports of a
	// multi-port service); optional.
	Ports func(dst netip.AddrPort) (addr string, ok bool)

	cfg   *tls.Config
	warns *rateLog
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
	a.cfg = a.Identity.ServerConfig()
}

// AcceptInbound implements Acceptor.
func (a *MeshAcceptor) AcceptInbound(ctx context.Context, raw *net.TCPConn) (Accepted, error) {
	src := raw.RemoteAddr().String()
	deadline := time.Now().Add(a.HandshakeTimeout)
	if a.Permissive {
		isTLS, err := startsWithTLS(raw, deadline)
		if err != nil {
			return Accepted{}, &Refused{Outcome: "handshake_error", Reason: "no data before the handshake timeout", Err: err}
		}
		if !isTLS {
			a.Logger.Debug("permissive: plain connection passed to the app", "src", src)
			return Accepted{Conn: raw, Keys: []string{"plain"}}, nil
		}
	}
	tc := tls.Server(newBatchConn(raw), a.cfg)
	hctx, cancel := context.WithDeadline(ctx, deadline)
	err := tc.HandshakeContext(hctx)
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
	source := intentions.Source{Name: id.Service, Namespace: id.Namespace, Partition: id.Partition}
	// A revocation closes the socket under the pump (the fastest way to
	// stop both directions) and leaves a mark, so the connection is counted
	// as revoked instead of failing with a read error.
	revoked := new(atomic.Bool)
	d, done := a.Intentions.Admit(source, func() { revoked.Store(true); raw.Close() })
	if !d.Allow {
		if ok, n := a.warns.allow("deny|" + id.String() + "|" + d.Intention); ok {
			a.Logger.Warn("inbound connection denied by intentions", "src", src, "source", id.Service,
				"destination", a.Service, "intention", d.Intention, "reason", d.Reason, "suppressed_since_last", n)
		}
		if a.Denied != nil {
			a.Denied.With(id.Service, a.Service, intentionLabel(d)).Inc()
		}
		return Accepted{Conn: tc}, &Refused{Outcome: "denied", Reason: fmt.Sprintf("intentions: %s", d.Reason)}
	}
	a.Logger.Debug("inbound connection authorized", "src", src, "peer", id.String(), "intention", d.Intention)
	acc := Accepted{Conn: tc, Peer: id.String(), Keys: []string{"source:" + id.Service}, Done: done, Revoked: revoked.Load}
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

// startsWithTLS peeks (without consuming) at the first byte: a TLS record of
// type handshake (22) opens every ClientHello. Peeking keeps the socket a
// plain *net.TCPConn, so a permissive plain connection still splices.
func startsWithTLS(c *net.TCPConn, deadline time.Time) (bool, error) {
	if err := c.SetReadDeadline(deadline); err != nil {
		return false, err
	}
	defer c.SetReadDeadline(time.Time{})
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

// intentionLabel names the deciding intention for the denied metric.
func intentionLabel(d intentions.Decision) string {
	if d.Intention == "" {
		return "default"
	}
	return d.Intention
}

// NewDeniedMetric is the counter MeshAcceptor.Denied expects.
func NewDeniedMetric() *CounterVec {
	return NewCounterVec("ferry_intentions_denied_total",
		"Inbound connections closed after the handshake because intentions deny their source.",
		"source", "destination", "intention")
}
