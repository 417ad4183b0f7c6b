package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/ferrymesh/ferry/listener"
	"github.com/ferrymesh/ferry/proxy/pump"
)

// handleOutbound serves one connection redirected to the outbound listener.
func (p *Proxy) handleOutbound(ln *listener.Listener, c *net.TCPConn) {
	const dir = "outbound"
	start := time.Now()
	// From here on a crash of ferry resets the app's connection instead
	// of ending it with a FIN (see pump.ArmReset); refusals reset anyway.
	pump.ArmReset(c)
	src := addrPortOf(c.RemoteAddr())
	local := addrPortOf(c.LocalAddr())
	dst, err := listener.OriginalDst(c)
	if err == nil && dst.Addr().Unmap() == local.Addr().Unmap() && dst.Port() == local.Port() {
		err = errors.New("original destination is the outbound listener itself")
	}
	if err != nil {
		// Dialing "the original destination" now would connect back to
		// this listener, forever. Refuse instead.
		if ok, n := p.warns.allow("loop"); ok {
			p.log.Warn("refusing outbound connection that was not redirected", "src", src, "listener", local, "error", err,
				"suppressed_since_last", n)
		}
		p.m.Connections.With(dir, "loop").Inc()
		reset(c)
		return
	}
	if p.cfg.OwnSockets.IsOwn(src, dst) {
		// ferry's own dial was redirected back to it: its UID is not the
		// one the rules exempt. Every further hop would cost two more fds.
		p.loopOnce.Do(func() {
			p.log.Error(fmt.Sprintf("redirect loop: a connection ferry made came back to its outbound listener. "+
				"ferry runs as UID %d, but the redirect rules exempt only the proxy UID (-proxy-uid); "+
				"run ferry as the -proxy-uid or exclude its UID. Looping connections are reset (outcome loop).", os.Getuid()),
				"src", src, "dst", dst)
		})
		p.m.Connections.With(dir, "loop").Inc()
		reset(c)
		return
	}

	// Bounded: a router that has not loaded its view waits for it (see
	// Router) rather than guessing.
	rctx, rcancel := context.WithTimeout(p.base, p.cfg.ConnectTimeout)
	route := (*p.router.Load()).RouteOutbound(rctx, dst)
	rcancel()
	var dial DialFunc
	switch route.Action {
	case Passthrough:
		dial = p.dialTCP(&target{ap: dst})
	case Dial:
		if route.Dial == nil {
			p.log.Error("router returned Dial without a DialFunc", "dst", dst, "upstream", route.Upstream)
			p.m.Connections.With(dir, "error").Inc()
			reset(c)
			return
		}
		dial = route.Dial
	default:
		outcome := route.Outcome
		if outcome == "" {
			outcome = "rejected"
		}
		// Once per outcome and destination per interval: an app retrying
		// a refused address (not ready, contested) must not flood the log.
		if ok, n := p.warns.allow("reject|" + outcome + "|" + dst.Addr().String()); ok {
			p.log.Info("outbound connection rejected", "src", src, "dst", dst, "upstream", route.Upstream, "reason", route.Reason,
				"outcome", outcome, "suppressed_since_last", n)
		}
		p.m.Connections.With(dir, outcome).Inc()
		reset(c)
		return
	}

	info := ConnInfo{Direction: Outbound, Source: src, Destination: dst, Upstream: route.Upstream, Keys: route.Keys, Started: start}
	p.connect(c, dial, info, start, nil)
}

// handleInbound serves one connection redirected to the inbound listener.
func (p *Proxy) handleInbound(ln *listener.Listener, c *net.TCPConn) {
	const dir = "inbound"
	start := time.Now()
	src := addrPortOf(c.RemoteAddr())
	in, err := (*p.acceptor.Load()).AcceptInbound(p.base, c)
	if err == nil && in.Conn == nil {
		err = errors.New("acceptor returned no connection")
	}
	if err == nil {
		// Out of the pending-handshake budget, into -max-connections.
		if err := ln.Established(c); err != nil { // counted by the listener
			p.log.Debug("inbound connection dropped after its handshake", "src", src, "error", err)
			if in.Done != nil {
				in.Done()
			}
			in.Conn.Close()
			c.Close()
			return
		}
	}
	if err != nil {
		if ln.Evicted(c) {
			// Reset to make room for newer handshakes (counted by the
			// listener); the acceptor's error is only the consequence.
			p.log.Debug("inbound handshake evicted", "src", src, "error", err)
			if in.Conn != nil {
				in.Conn.Close()
			}
			c.Close()
			return
		}
		p.refuseInbound(c, in, err)
		return
	}
	for {
		dial := in.Dial
		if dial == nil {
			dial = p.dialTCP(p.localApp.Load())
		}
		info := ConnInfo{Direction: Inbound, Source: src, Destination: addrPortOf(c.LocalAddr()), Peer: in.Peer, Keys: in.Keys, Started: start}
		p.connect(in.Conn, dial, info, start, in.Revoked)
		if in.Done != nil {
			in.Done()
		}
		if in.Next == nil {
			return
		}
		// A tunnel session: serve the next connection it carries.
		next, err := in.Next(p.drain)
		if err != nil {
			var rf *Refused
			if errors.As(err, &rf) {
				p.refuseInbound(c, next, err)
			} else {
				p.log.Trace("tunnel session ended", "src", src, "error", err)
			}
			return
		}
		in, start = next, time.Now()
	}
}

// refuseInbound closes a connection the acceptor refused, counted under the
// Refused's outcome.
func (p *Proxy) refuseInbound(c *net.TCPConn, in Accepted, err error) {
	outcome := "handshake_error"
	var rf *Refused
	if errors.As(err, &rf) {
		outcome = rf.Outcome
		if rf.Reset {
			_ = c.SetLinger(0)
		}
	}
	// The acceptor logs the specifics (it knows the peer); this layer only
	// knows an inbound connection ended here.
	p.log.Debug("inbound connection refused", "src", addrPortOf(c.RemoteAddr()), "outcome", outcome, "error", err)
	p.m.Connections.With("inbound", outcome).Inc()
	if in.Conn != nil {
		in.Conn.Close()
	}
	c.Close()
}

// connect dials the upstream leg, then pumps until both sides are done.
// revoked (optional) is Accepted.Revoked.
func (p *Proxy) connect(down net.Conn, dial DialFunc, info ConnInfo, start time.Time, revoked func() bool) {
	dir := info.Direction.String()
	ctx, cancel := context.WithCancelCause(p.base)
	defer cancel(nil)

	dctx, dcancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	up, err := dial(dctx)
	dcancel()
	if err != nil {
		if ok, n := p.warns.allow("dial|" + dir + "|" + info.Upstream + "|" + info.Destination.String()); ok {
			p.log.Warn("dial failed", "direction", dir, "src", info.Source, "dst", info.Destination,
				"upstream", info.Upstream, "error", err, "suppressed_since_last", n)
		}
		p.m.DialErrors.With(dir).Inc()
		p.m.Connections.With(dir, "dial_error").Inc()
		// The app's connect already succeeded (the proxy accepted it); a
		// reset is the closest thing to "connection refused" it can get.
		reset(down)
		return
	}

	// Plain TCP legs (the app's, a passthrough destination, a permissive
	// inbound client) are reset by the kernel if ferry dies mid-stream;
	// the pump disarms them before a clean close. The outbound app leg
	// was armed when it was accepted.
	if info.Direction == Inbound {
		pump.ArmReset(down)
	}
	pump.ArmReset(up)

	_, untrack := p.reg.track(info, cancel)
	active := p.m.Active.With(dir)
	active.Add(1)
	idle := p.cfg.IdleTimeout
	if idle < 0 {
		idle = 0
	}
	st := pump.Pump(ctx, down, up, idle)
	active.Add(-1)
	untrack()

	p.m.SentBytes.With(dir).Add(st.Sent)
	p.m.ReceivedBytes.With(dir).Add(st.Received)
	p.m.Duration.With(dir).Observe(time.Since(start))
	outcome := "ok"
	switch {
	case st.Err == nil:
	case errors.Is(st.Err, pump.ErrIdle):
		outcome = "idle_timeout"
	case revoked != nil && revoked():
		outcome = "revoked" // the acceptor closed it: authorization withdrawn
	case context.Cause(ctx) != nil && errors.Is(st.Err, context.Cause(ctx)):
		outcome = "closed" // revoked through the registry, or shutdown
	default:
		outcome = "error"
	}
	p.m.Connections.With(dir, outcome).Inc()
	if st.Err != nil {
		p.log.Debug("connection ended", "direction", dir, "src", info.Source, "dst", info.Destination,
			"peer", info.Peer, "upstream", info.Upstream, "sent", st.Sent, "received", st.Received,
			"outcome", outcome, "error", st.Err)
	}
}

func (p *Proxy) dialTCP(t *target) DialFunc {
	// Not net.Dialer.DialTCP with a zero local address: that becomes a
	// non-nil *TCPAddr, i.e. an explicit bind to port 0 before connect,
	// which reserves ephemeral ports per pod instead of per destination
	// (bind: address already in use under connection churn, and
	// tcp_tw_reuse cannot help).
	addr := t.addr
	if addr == "" {
		addr = t.ap.String()
	}
	return func(ctx context.Context) (net.Conn, error) {
		return p.cfg.Dialer.DialContext(ctx, "tcp", addr)
	}
}

// reset closes c with RST where possible.
func reset(c net.Conn) {
	if tc := pump.TCPOf(c); tc != nil {
		_ = tc.SetLinger(0)
	}
	c.Close()
}
