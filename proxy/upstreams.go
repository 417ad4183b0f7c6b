package proxy

import (
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/listener"
)

// Upstream is an explicit upstream from the proxy registration: a local
// listener (LocalBindAddress:LocalBindPort) every connection of which goes
// to one mesh service, whatever the app dialed.
type Upstream struct {
	// Addr is the listen address, e.g. 127.0.0.1:9191.
	Addr string
	// Name labels logs and metrics (the destination service).
	Name string
	// Route is asked once per connection; it must answer from memory.
	Route func() Route
}

type upstreamListener struct {
	ln    *listener.Listener
	name  string
	route atomic.Pointer[func() Route]
}

// SetUpstreams makes the explicit upstream listeners exactly ups: listeners
// whose address is unchanged keep serving (their route is updated), removed
// ones stop accepting (established connections finish), new ones bind.
// Errors binding a new listener are returned together; the others apply.
func (p *Proxy) SetUpstreams(ups []Upstream) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.draining {
		return fmt.Errorf("upstreams: proxy is shutting down")
	}
	if p.upstreams == nil {
		p.upstreams = map[string]*upstreamListener{}
	}
	want := map[string]Upstream{}
	for _, u := range ups {
		want[u.Addr] = u
	}
	for addr, ul := range p.upstreams {
		if _, ok := want[addr]; !ok {
			ul.ln.Close()
			delete(p.upstreams, addr)
			p.log.Info("upstream listener removed", "upstream", ul.name, "addr", addr)
		}
	}
	var errs []error
	for addr, u := range want {
		route := u.Route
		if ul, ok := p.upstreams[addr]; ok {
			ul.name = u.Name
			ul.route.Store(&route)
			continue
		}
		ln, err := p.listen(addr, Outbound)
		if err != nil {
			errs = append(errs, fmt.Errorf("upstream %s: %w", u.Name, err))
			continue
		}
		ul := &upstreamListener{ln: ln, name: u.Name}
		ul.route.Store(&route)
		p.upstreams[addr] = ul
		p.serve(ln, "upstream "+u.Name, func(c *net.TCPConn) { p.handleUpstream(ul, c) })
		p.log.Info("upstream listener", "upstream", u.Name, "addr", ln.Addr())
	}
	if len(errs) > 0 {
		return fmt.Errorf("upstreams: %v", errs)
	}
	return nil
}

// UpstreamAddrs returns the bound address of each explicit upstream by name.
func (p *Proxy) UpstreamAddrs() map[string]net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := map[string]net.Addr{}
	for _, ul := range p.upstreams {
		m[ul.name] = ul.ln.Addr()
	}
	return m
}

func (p *Proxy) handleUpstream(ul *upstreamListener, c *net.TCPConn) {
	const dir = "outbound"
	start := time.Now()
	route := (*ul.route.Load())()
	if route.Action != Dial || route.Dial == nil {
		p.log.Info("upstream connection rejected", "upstream", ul.name, "reason", route.Reason)
		p.m.Connections.With(dir, "rejected").Inc()
		reset(c)
		return
	}
	info := ConnInfo{Direction: Outbound, Source: addrPortOf(c.RemoteAddr()), Destination: addrPortOf(c.LocalAddr()),
		Upstream: route.Upstream, Keys: route.Keys, Started: start}
	p.connect(c, route.Dial, info, start, nil)
}
