package tunnel

import (
	"sync"
	"time"

	"github.com/ferrymesh/ferry/proxy/pump"
)

// Pool keeps the client side's idle tunnel sessions, by dial address
// (one instance's ip:port; the session's identity checks were made for it).
type Pool struct {
	maxIdle    int // per address
	idle, age  time.Duration
	generation func() uint64 // the identity's; a change retires sessions
	now        func() time.Time

	mu     sync.Mutex
	conns  map[string][]pooledSession
	sweep  *time.Timer // pending while sessions are pooled
	closed bool
}

type pooledSession struct {
	tc        Session
	created   time.Time
	idleSince time.Time
	gen       uint64
}

func NewPool(generation func() uint64) *Pool {
	return &Pool{maxIdle: 16, idle: tunnelIdle, age: tunnelMaxAge, generation: generation,
		now: time.Now, conns: map[string][]pooledSession{}}
}

// Get returns an idle session for addr that is still good to carry a
// tunnel, closing the stale ones it meets, or nil.
func (p *Pool) Get(addr string) (Session, time.Time, uint64) {
	now, gen := p.now(), p.generation()
	for {
		p.mu.Lock()
		list := p.conns[addr]
		if len(list) == 0 {
			p.mu.Unlock()
			return nil, time.Time{}, 0
		}
		s := list[len(list)-1] // the most recently used: least likely to be stale
		p.conns[addr] = list[:len(list)-1]
		if len(list) == 1 {
			delete(p.conns, addr)
		}
		p.mu.Unlock()
		if now.Sub(s.idleSince) < p.idle && now.Sub(s.created) < p.age && s.gen == gen && quiet(s.tc) {
			return s.tc, s.created, s.gen
		}
		s.tc.Close()
	}
}

// Put keeps a session whose tunnel ended cleanly, or closes it.
func (p *Pool) Put(addr string, tc Session, created time.Time, gen uint64) {
	now := p.now()
	if now.Sub(created) >= p.age || gen != p.generation() {
		tc.Close()
		return
	}
	p.mu.Lock()
	list := p.conns[addr]
	if len(list) >= p.maxIdle {
		p.mu.Unlock()
		tc.Close()
		return
	}
	if p.closed {
		p.mu.Unlock()
		tc.Close()
		return
	}
	p.conns[addr] = append(list, pooledSession{tc: tc, created: created, idleSince: now, gen: gen})
	if p.sweep == nil {
		// Sessions nobody asks for again would otherwise sit in CLOSE_WAIT
		// once the server closes them.
		p.sweep = time.AfterFunc(p.idle, p.expire)
	}
	p.mu.Unlock()
}

// expire closes the sessions idle for too long, and runs again while any
// are left.
func (p *Pool) expire() {
	now := p.now()
	var stale []Session
	p.mu.Lock()
	for addr, list := range p.conns {
		kept := list[:0]
		for _, s := range list {
			if now.Sub(s.idleSince) >= p.idle || now.Sub(s.created) >= p.age {
				stale = append(stale, s.tc)
			} else {
				kept = append(kept, s)
			}
		}
		if len(kept) == 0 {
			delete(p.conns, addr)
		} else {
			p.conns[addr] = kept
		}
	}
	p.sweep = nil
	if len(p.conns) > 0 && !p.closed {
		p.sweep = time.AfterFunc(p.idle/2, p.expire)
	}
	p.mu.Unlock()
	for _, tc := range stale {
		tc.Close()
	}
}

// CloseAll closes every idle session (shutdown).
func (p *Pool) CloseAll() {
	p.mu.Lock()
	all := p.conns
	p.conns = map[string][]pooledSession{}
	p.closed = true
	if p.sweep != nil {
		p.sweep.Stop()
		p.sweep = nil
	}
	p.mu.Unlock()
	for _, list := range all {
		for _, s := range list {
			s.tc.Close()
		}
	}
}

// quiet reports whether an idle session's socket has nothing to read: a
// server sends nothing between tunnels but a GOAWAY, so anything there (a
// GOAWAY, a close_notify, a FIN, a reset) means the session is over. One
// that ends just after this check is the replay's case (goaway.go).
func quiet(tc Session) bool {
	tcp := pump.TCPOf(tc)
	if tcp == nil {
		return false
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return false
	}
	ok := false
	_ = rc.Read(func(fd uintptr) bool {
		ok = !pump.Readable(fd)
		return true
	})
	return ok
}
