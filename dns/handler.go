package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// ServeDNS implements dns.Handler. It never panics and never blocks on
// anything but its own query's upstream exchange (bounded by QueryTimeout).
func (s *Server) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("bug: panic while handling a query; answering SERVFAIL", "panic", p)
			m := new(mdns.Msg)
			m.SetRcode(req, mdns.RcodeServerFailure)
			m.Question = nil
			_ = w.WriteMsg(m)
		}
	}()
	_, tcp := w.RemoteAddr().(*net.TCPAddr)
	resp := s.handle(s.ctx, req, tcp)
	if resp == nil {
		return
	}
	if resp.Rcode == mdns.RcodeServerFailure {
		s.stats.servFail.Add(1)
	}
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("write answer", "client", w.RemoteAddr(), "error", err)
	}
}

// handle answers req; nil means drop it.
func (s *Server) handle(ctx context.Context, req *mdns.Msg, tcp bool) *mdns.Msg {
	if req.Response {
		return nil // never answer answers: reflection loops
	}
	s.stats.queries.Add(1)
	if req.Opcode != mdns.OpcodeQuery {
		return s.finish(req, rcodeOnly(mdns.RcodeNotImplemented), tcp)
	}
	if len(req.Question) != 1 {
		return s.finish(req, rcodeOnly(mdns.RcodeFormatError), tcp)
	}
	q := req.Question[0]
	switch {
	case q.Qtype == mdns.TypeOPT || q.Qtype == mdns.TypeTSIG || q.Qtype == mdns.TypeNone:
		return s.finish(req, rcodeOnly(mdns.RcodeFormatError), tcp)
	case q.Qtype == mdns.TypeANY || q.Qtype == mdns.TypeAXFR || q.Qtype == mdns.TypeIXFR ||
		q.Qtype == mdns.TypeMAILA || q.Qtype == mdns.TypeMAILB:
		// RFC 8482 lets us refuse ANY; zone transfers are not ours to give.
		return s.finish(req, rcodeOnly(mdns.RcodeNotImplemented), tcp)
	case q.Qclass != mdns.ClassINET:
		return s.finish(req, rcodeOnly(mdns.RcodeNotImplemented), tcp)
	}
	if opt := req.IsEdns0(); opt != nil && opt.Version() != 0 {
		return s.finish(req, rcodeOnly(mdns.RcodeBadVers), tcp) // RFC 6891 section 6.1.3
	}
	if isLoop(req, s.nonce) {
		s.stats.loops.Add(1)
		s.log.Warn("query came back to us: forwarding loop; answering SERVFAIL", "name", q.Name)
		return s.finish(req, rcodeOnly(mdns.RcodeServerFailure), tcp)
	}

	name := strings.ToLower(q.Name)
	if !mdns.IsFqdn(name) {
		name = mdns.Fqdn(name)
	}
	ni := classify(name, &s.cfg, s.datacenter())
	if ni.service != "" && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeAAAA) {
		if vip, ok := s.cfg.Mesh.VirtualIP(ni.service); ok {
			s.stats.mesh.Add(1)
			return s.finish(req, s.meshAnswer(req, ni, vip.Unmap()), tcp)
		}
		if ni.virtual {
			// Consul answers an unknown <svc>.virtual with an empty
			// NOERROR; a name that is no mesh service does not exist.
			return s.finish(req, s.negative(req, ni.zone, mdns.RcodeNameError), tcp)
		}
	}

	fwd := s.recursors
	if ni.kind == zoneConsul && s.consul != nil {
		fwd = s.consul
	}
	if fwd == nil {
		if ni.kind == zoneOther {
			return s.finish(req, rcodeOnly(mdns.RcodeServerFailure), tcp)
		}
		// Nobody to ask: a name in our zones that is not a mesh service
		// does not exist.
		return s.finish(req, s.negative(req, ni.zone, mdns.RcodeNameError), tcp)
	}
	return s.finish(req, s.forward(ctx, req, name, fwd), tcp)
}

func (s *Server) meshAnswer(req *mdns.Msg, ni nameInfo, vip netip.Addr) *mdns.Msg {
	q := req.Question[0]
	hdr := mdns.RR_Header{Name: q.Name, Class: mdns.ClassINET, Ttl: ttlSeconds(s.cfg.MeshTTL)}
	var rr mdns.RR
	switch {
	case q.Qtype == mdns.TypeA && vip.Is4():
		hdr.Rrtype = mdns.TypeA
		rr = &mdns.A{Hdr: hdr, A: net.IP(vip.AsSlice())}
	case q.Qtype == mdns.TypeAAAA && !vip.Is4():
		hdr.Rrtype = mdns.TypeAAAA
		rr = &mdns.AAAA{Hdr: hdr, AAAA: net.IP(vip.AsSlice())}
	default:
		return s.negative(req, ni.zone, mdns.RcodeSuccess) // NODATA
	}
	m := new(mdns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	m.Answer = []mdns.RR{rr}
	return m
}

// negative is NXDOMAIN or NODATA with the zone's SOA, so that clients
// cache it for NegativeTTL (RFC 2308).
func (s *Server) negative(req *mdns.Msg, zone string, rcode int) *mdns.Msg {
	ttl := ttlSeconds(s.cfg.NegativeTTL)
	m := new(mdns.Msg)
	m.SetRcode(req, rcode)
	m.Authoritative = true
	m.Ns = []mdns.RR{&mdns.SOA{
		Hdr:     mdns.RR_Header{Name: zone, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: ttl},
		Ns:      "ns." + zone,
		Mbox:    "hostmaster." + zone,
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  ttl,
	}}
	return m
}

// flight is one upstream exchange that identical concurrent questions
// share, so that a burst of lookups of one name costs one upstream query.
type flight struct {
	done chan struct{}
	msg  *mdns.Msg // read-only once done is closed
	err  error
	// joined counts the queries waiting on this one (tests watch it).
	joined atomic.Int32
}

var errBusy = errors.New("too many queries in flight")

func (s *Server) forward(ctx context.Context, req *mdns.Msg, name string, fwd *forwarder) *mdns.Msg {
	q := req.Question[0]
	key := cacheKey{name: name, qtype: q.Qtype, qclass: q.Qclass}
	if opt := req.IsEdns0(); opt != nil {
		key.do = opt.Do()
	}
	if m := s.cache.get(key); m != nil {
		s.stats.cacheHits.Add(1)
		return m
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.QueryTimeout)
	defer cancel()

	s.flightMu.Lock()
	if f, ok := s.flights[key]; ok {
		if s.waiting.Add(1) > int64(cap(s.sem)) {
			s.waiting.Add(-1)
			s.flightMu.Unlock()
			return rcodeOnly(mdns.RcodeServerFailure)
		}
		defer s.waiting.Add(-1)
		f.joined.Add(1)
		s.stats.shared.Add(1)
		s.flightMu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return rcodeOnly(mdns.RcodeServerFailure)
		}
		if f.err != nil {
			return rcodeOnly(mdns.RcodeServerFailure)
		}
		return f.msg.Copy()
	}
	f := &flight{done: make(chan struct{})}
	s.flights[key] = f
	s.flightMu.Unlock()
	defer func() {
		s.flightMu.Lock()
		delete(s.flights, key)
		s.flightMu.Unlock()
		close(f.done)
	}()

	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	default:
		s.log.Debug("too many queries in flight; answering SERVFAIL", "name", q.Name)
		f.err = errBusy
		return rcodeOnly(mdns.RcodeServerFailure)
	}
	s.stats.forwarded.Add(1)
	f.msg, f.err = fwd.exchange(ctx, req)
	if f.err != nil {
		s.log.Debug("forward failed; answering SERVFAIL", "name", q.Name, "type", mdns.TypeToString[q.Qtype], "error", f.err)
		return rcodeOnly(mdns.RcodeServerFailure)
	}
	s.cache.put(key, f.msg)
	return f.msg.Copy() // the waiters read f.msg while the caller edits its answer
}

// finish turns m into the answer to req: header bits, the client's
// question as sent (case preserved), EDNS0 when the client used it, and
// truncation to what the client can take.
func (s *Server) finish(req, m *mdns.Msg, tcp bool) *mdns.Msg {
	m.Id = req.Id
	m.Response = true
	m.Opcode = req.Opcode
	m.RecursionDesired = req.RecursionDesired
	m.RecursionAvailable = true
	m.CheckingDisabled = req.CheckingDisabled
	m.Compress = true
	if len(req.Question) == 1 {
		m.Question = []mdns.Question{req.Question[0]}
	} else {
		m.Question = nil
	}
	size := mdns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(upstreamUDPSize, opt.Do())
		size = max(size, int(min(opt.UDPSize(), upstreamUDPSize)))
	}
	if tcp {
		size = mdns.MaxMsgSize
	}
	m.Truncate(size)
	return m
}

func rcodeOnly(rcode int) *mdns.Msg {
	m := new(mdns.Msg)
	m.Rcode = rcode
	return m
}

func ttlSeconds(d time.Duration) uint32 {
	return uint32(max(d/time.Second, 1))
}

// datacenter is the local datacenter for <svc>.service.<dc>.consul names:
// the configured one, else what the mesh view has learned (the sidecar's
// catalog view learns it from the agent after the server starts).
func (s *Server) datacenter() string {
	if s.cfg.Datacenter != "" || s.dcView == nil {
		return s.cfg.Datacenter
	}
	return strings.ToLower(s.dcView.Datacenter())
}
