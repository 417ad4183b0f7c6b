package listener

import (
	"container/list"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Handshake accounting. A connection that has not finished its handshake
// costs a goroutine, an fd and handshake state, yet proves nothing: anyone
// who can reach the port can open one and stay silent. Counting those
// against MaxConns let a handful of silent sockets lock out every valid
// client (audit F6). So they get their own budget, MaxPending (and
// MaxPendingPerSource), and MaxConns counts only connections whose handler
// called Established.
//
// When the budget is full, the oldest *silent* pending connection is
// reset, not the new one: one whose client has sent no byte for
// SilentAfter (the kernel's count of bytes received, TCP_INFO, so the
// handler need not have read them). Refusing the new one would let an
// attacker who keeps N silent sockets open hold the budget for good; a
// valid client sends its ClientHello right after connecting, so silent
// sockets go first and valid handshakes are left alone. Only when no
// pending connection is silent does the oldest go. Per source the cap
// counts silent connections only: a client sidecar opening 64 connections
// at once (a burst of real handshakes from one pod IP) must not have its
// own handshakes reset, while one source's silent sockets are capped and
// evict each other.

// ErrEvicted is returned by Established for a connection that was reset
// to make room for newer pending ones.
var ErrEvicted = errors.New("pending connection evicted by newer ones")

// ErrOverLimit is returned by Established when MaxConns connections are
// already established; the connection is to be reset (it has been counted
// through OnOverLimit).
var ErrOverLimit = errors.New("connection limit reached")

type pendingConn struct {
	c           *net.TCPConn
	src         netip.Addr
	since       time.Time
	elem        *list.Element // in pendingSet.order while pending
	evicted     bool
	established bool
}

type pendingSet struct {
	mu       sync.Mutex
	conns    map[*net.TCPConn]*pendingConn // every tracked handler's conn
	order    list.List                     // pending, oldest first
	bySrc    map[netip.Addr][]*pendingConn // pending, oldest first
	estab    int
	lastWarn time.Time
}

func (s *pendingSet) init() {
	s.conns = map[*net.TCPConn]*pendingConn{}
	s.bySrc = map[netip.Addr][]*pendingConn{}
}

// admitPending starts tracking c as pending, evicting the oldest pending
// connection (of its source first) when the budget is full. It returns
// false when MaxConns connections are established (c is to be refused).
func (l *Listener) admitPending(c *net.TCPConn) bool {
	s := &l.pend
	var src netip.Addr
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		src = sourceKey(ta.AddrPort().Addr())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if l.opts.MaxConns > 0 && s.estab >= l.opts.MaxConns {
		return false
	}
	now := time.Now()
	if n := l.opts.MaxPendingPerSource; n > 0 && len(s.bySrc[src]) >= n {
		var silent []*pendingConn
		for _, pc := range s.bySrc[src] {
			if l.silent(pc, now) {
				silent = append(silent, pc)
			}
		}
		if len(silent) >= n {
			l.evictLocked(silent[0], "source")
		}
	}
	if s.order.Len() >= l.opts.MaxPending {
		victim := s.order.Front().Value.(*pendingConn)
		for e := s.order.Front(); e != nil; e = e.Next() {
			if pc := e.Value.(*pendingConn); l.silent(pc, now) {
				victim = pc
				break
			}
		}
		l.evictLocked(victim, "total")
	}
	pc := &pendingConn{c: c, src: src, since: now}
	pc.elem = s.order.PushBack(pc)
	if l.opts.MaxPendingPerSource > 0 {
		s.bySrc[src] = append(s.bySrc[src], pc)
	}
	s.conns[c] = pc
	return true
}

// silent reports whether pc's client has sent nothing in SilentAfter:
// the kernel's count of bytes received on the socket is still zero.
func (l *Listener) silent(pc *pendingConn, now time.Time) bool {
	if now.Sub(pc.since) < l.opts.SilentAfter {
		return false
	}
	rc, err := pc.c.SyscallConn()
	if err != nil {
		return true // closed: the first to go
	}
	received := uint64(0)
	if cerr := rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			received = info.Bytes_received
		}
	}); cerr != nil {
		return true
	}
	return received == 0
}

// sourceKey is what MaxPendingPerSource counts by: the IPv4 address, or
// the /64 of a global IPv6 address. One host gets a whole /64 (SLAAC,
// privacy addresses, a cloud NIC's prefix), so per address an IPv6 client
// would have as many budgets as it likes. Link-local addresses are the
// exception: every neighbour's is in fe80::/64, so they count per address,
// as IPv4 neighbours do.
func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap().WithZone("")
	if a.Is6() && a.IsGlobalUnicast() {
		if p, err := a.Prefix(64); err == nil {
			return p.Addr()
		}
	}
	return a
}

func (l *Listener) evictLocked(pc *pendingConn, budget string) {
	s := &l.pend
	l.unpendLocked(pc)
	pc.evicted = true
	if l.opts.OnPendingEvicted != nil {
		l.opts.OnPendingEvicted()
	}
	_ = pc.c.SetLinger(0)
	_ = pc.c.Close() // the handler's handshake fails at once
	if now := time.Now(); now.Sub(s.lastWarn) >= time.Second {
		s.lastWarn = now
		l.log.Warn("pending handshakes over budget, resetting the oldest", "budget", budget,
			"max_pending", l.opts.MaxPending, "max_pending_per_source", l.opts.MaxPendingPerSource, "remote", pc.c.RemoteAddr())
	}
}

func (l *Listener) unpendLocked(pc *pendingConn) {
	s := &l.pend
	if pc.elem == nil {
		return
	}
	s.order.Remove(pc.elem)
	pc.elem = nil
	if q := s.bySrc[pc.src]; q != nil {
		for i, x := range q {
			if x == pc {
				q = append(q[:i], q[i+1:]...)
				break
			}
		}
		if len(q) == 0 {
			delete(s.bySrc, pc.src)
		} else {
			s.bySrc[pc.src] = q
		}
	}
}

// Established ends c's handshake: from now on it counts against MaxConns,
// no longer against the pending budget. It returns ErrEvicted if c was
// already reset to make room for newer pending connections, and
// ErrOverLimit (after arranging a reset on close) if MaxConns connections
// are established; the handler then closes c and stops. Without handshake
// accounting (MaxPending 0) it returns nil.
func (l *Listener) Established(c *net.TCPConn) error {
	s := &l.pend
	s.mu.Lock()
	defer s.mu.Unlock()
	pc := s.conns[c]
	switch {
	case pc == nil || pc.established:
		return nil
	case pc.evicted:
		return ErrEvicted
	}
	l.unpendLocked(pc)
	if l.opts.MaxConns > 0 && s.estab >= l.opts.MaxConns {
		_ = c.SetLinger(0)
		if l.opts.OnOverLimit != nil {
			l.opts.OnOverLimit()
		}
		return ErrOverLimit
	}
	pc.established = true
	s.estab++
	return nil
}

// Evicted reports whether c was reset to make room for newer pending
// connections (already counted through OnPendingEvicted).
func (l *Listener) Evicted(c *net.TCPConn) bool {
	s := &l.pend
	s.mu.Lock()
	defer s.mu.Unlock()
	pc := s.conns[c]
	return pc != nil && pc.evicted
}

// Pending is the number of connections still in their handshake.
func (l *Listener) Pending() int {
	s := &l.pend
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.order.Len()
}

// forget stops tracking c once its handler has returned.
func (l *Listener) forget(c *net.TCPConn) {
	if l.opts.MaxPending <= 0 {
		return
	}
	s := &l.pend
	s.mu.Lock()
	defer s.mu.Unlock()
	pc := s.conns[c]
	if pc == nil {
		return
	}
	delete(s.conns, c)
	l.unpendLocked(pc)
	if pc.established {
		s.estab--
	}
}
