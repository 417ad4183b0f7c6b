package proxy

import (
	"cmp"
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// ErrRevoked is the default cause for connections closed through the
// Registry (e.g. an intention turned to deny).
var ErrRevoked = errors.New("connection revoked")

// Direction tells inbound from outbound connections.
type Direction int

const (
	Inbound Direction = iota
	Outbound
)

func (d Direction) String() string {
	if d == Inbound {
		return "inbound"
	}
	return "outbound"
}

// ConnInfo describes a live connection.
type ConnInfo struct {
	ID        uint64
	Direction Direction
	// Source is the downstream peer address; Destination the original
	// destination (outbound) or the listener address (inbound).
	Source, Destination netip.AddrPort
	// Peer is the authenticated identity (inbound mTLS), "" otherwise.
	Peer string
	// Upstream names the route (outbound), "" for passthrough.
	Upstream string
	// Keys are the hook-supplied keys (Route.Keys, Accepted.Keys).
	Keys    []string
	Started time.Time
}

// Registry tracks every connection that is being pumped so that it can be
// closed from outside: live intention revocation, shutdown. Safe for
// concurrent use.
type Registry struct {
	mu    sync.Mutex
	next  uint64
	conns map[uint64]*regEntry
}

type regEntry struct {
	info   ConnInfo
	cancel context.CancelCauseFunc
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{conns: make(map[uint64]*regEntry)} }

// track adds a connection; cancel must abort its pump. The returned func
// removes it again.
func (r *Registry) track(info ConnInfo, cancel context.CancelCauseFunc) (uint64, func()) {
	r.mu.Lock()
	r.next++
	id := r.next
	info.ID = id
	r.conns[id] = &regEntry{info: info, cancel: cancel}
	r.mu.Unlock()
	return id, func() {
		r.mu.Lock()
		delete(r.conns, id)
		r.mu.Unlock()
	}
}

// CloseMatching closes every live connection for which match returns true
// and returns how many it closed. cause (ErrRevoked if nil) is recorded as
// the connection's end reason. match runs under the registry lock: keep it
// a pure lookup.
func (r *Registry) CloseMatching(match func(ConnInfo) bool, cause error) int {
	if cause == nil {
		cause = ErrRevoked
	}
	var victims []context.CancelCauseFunc
	r.mu.Lock()
	for _, e := range r.conns {
		if match(e.info) {
			victims = append(victims, e.cancel)
		}
	}
	r.mu.Unlock()
	for _, c := range victims {
		c(cause)
	}
	return len(victims)
}

// CloseKey closes every live connection tracked with key among its Keys.
func (r *Registry) CloseKey(key string, cause error) int {
	return r.CloseMatching(func(ci ConnInfo) bool { return slices.Contains(ci.Keys, key) }, cause)
}

// CloseAll closes every live connection.
func (r *Registry) CloseAll(cause error) int {
	return r.CloseMatching(func(ConnInfo) bool { return true }, cause)
}

// Len is the number of live connections.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}

// Snapshot lists the live connections.
func (r *Registry) Snapshot() []ConnInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]ConnInfo, 0, len(r.conns))
	for _, e := range r.conns {
		out = append(out, e.info)
	}
	slices.SortFunc(out, func(a, b ConnInfo) int { return cmp.Compare(a.ID, b.ID) })
	return out
}
