package proxy

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ownSocketTTL is how long a socket ferry dialed is remembered. A looped
// connection reaches the outbound listener while its connect is still
// completing, so a few seconds are plenty even on a loaded node.
const ownSocketTTL = 5 * time.Second

// OwnSockets remembers the sockets ferry itself dials, so that the outbound
// listener can recognize one of them arriving back at it: a redirect loop,
// which happens when ferry runs under a UID the redirect rules do not
// exempt (audit F13). Each hop would otherwise cost two fds and two
// goroutines until the process runs out.
//
// A socket is recorded before it connects (Control, a net.Dialer hook),
// because the looped connection can be accepted before the dial returns.
// Its local address is only assigned by connect, so it is read
// (getsockname) when the outbound listener asks about the destination the
// socket was dialing. A connection is ferry's own when both its source
// (our local address) and its original destination match one socket:
// while that socket is open no other socket can have the same pair.
type OwnSockets struct {
	ttl time.Duration
	now func() time.Time

	mu       sync.Mutex
	fifo     []*ownSocket                     // recorded, oldest first (expiry)
	unknown  map[netip.AddrPort][]*ownSocket  // by destination, local address not read yet
	resolved map[[2]netip.AddrPort]*ownSocket // by {local, destination}
}

type ownSocket struct {
	dst   netip.AddrPort
	local netip.AddrPort // zero until read
	rc    syscall.RawConn
	at    time.Time
	gone  bool // expired or closed
}

// NewOwnSockets returns an empty set.
func NewOwnSockets() *OwnSockets {
	return &OwnSockets{ttl: ownSocketTTL, now: time.Now,
		unknown: map[netip.AddrPort][]*ownSocket{}, resolved: map[[2]netip.AddrPort]*ownSocket{}}
}

// Dialer returns a copy of d that records every socket it dials.
func (o *OwnSockets) Dialer(d *net.Dialer) *net.Dialer {
	nd := *d
	inner, innerCtx := d.Control, d.ControlContext
	nd.Control = nil
	nd.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
		o.Control(ctx, network, address, c)
		switch {
		case innerCtx != nil:
			return innerCtx(ctx, network, address, c)
		case inner != nil:
			return inner(network, address, c)
		}
		return nil
	}
	return &nd
}

// Control is a net.Dialer.ControlContext that records the socket about to
// connect to address. It never fails the dial.
func (o *OwnSockets) Control(_ context.Context, _, address string, c syscall.RawConn) error {
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil
	}
	s := &ownSocket{dst: normalAddrPort(dst), rc: c, at: o.now()}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.expireLocked(s.at)
	o.fifo = append(o.fifo, s)
	o.unknown[s.dst] = append(o.unknown[s.dst], s)
	return nil
}

// IsOwn reports whether a connection from src whose original destination
// is dst is one of the recorded sockets.
func (o *OwnSockets) IsOwn(src, dst netip.AddrPort) bool {
	src, dst = normalAddrPort(src), normalAddrPort(dst)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.expireLocked(o.now())
	if _, ok := o.resolved[[2]netip.AddrPort{src, dst}]; ok {
		return true
	}
	q := o.unknown[dst]
	if len(q) == 0 {
		return false
	}
	kept := q[:0]
	for _, s := range q {
		if s.gone {
			continue
		}
		local, err := sockname(s.rc)
		switch {
		case err != nil: // closed: the dial failed, or it is long over
			s.gone = true
			continue
		case local.Port() == 0: // not connecting yet
			kept = append(kept, s)
			continue
		}
		s.local = normalAddrPort(local)
		o.resolved[[2]netip.AddrPort{s.local, dst}] = s
	}
	clear(q[len(kept):])
	if len(kept) == 0 {
		delete(o.unknown, dst)
	} else {
		o.unknown[dst] = kept
	}
	_, ok := o.resolved[[2]netip.AddrPort{src, dst}]
	return ok
}

// Len is the number of sockets remembered (tests).
func (o *OwnSockets) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.expireLocked(o.now())
	return len(o.fifo)
}

func (o *OwnSockets) expireLocked(now time.Time) {
	n := 0
	for n < len(o.fifo) && now.Sub(o.fifo[n].at) >= o.ttl {
		s := o.fifo[n]
		s.gone = true
		if s.local.IsValid() {
			k := [2]netip.AddrPort{s.local, s.dst}
			if o.resolved[k] == s {
				delete(o.resolved, k)
			}
		} else if q := o.unknown[s.dst]; len(q) > 0 && q[0] == s {
			// Recorded in order, so the oldest unread one is first.
			if len(q) == 1 {
				delete(o.unknown, s.dst)
			} else {
				q[0] = nil
				o.unknown[s.dst] = q[1:]
			}
		}
		n++
	}
	if n > 0 {
		clear(o.fifo[:n])
		o.fifo = o.fifo[n:]
	}
}

// sockname reads the socket's local address; it fails once the socket is
// closed (RawConn holds the fd's reference count, not a bare number).
func sockname(rc syscall.RawConn) (netip.AddrPort, error) {
	var sa unix.Sockaddr
	var serr error
	if err := rc.Control(func(fd uintptr) { sa, serr = unix.Getsockname(int(fd)) }); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, serr
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)), nil
	}
	return netip.AddrPort{}, nil
}

func normalAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}
