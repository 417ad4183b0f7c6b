package dns

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// loopOption is the EDNS0 local option ferry puts on every query it
// forwards, carrying a per-server random nonce. A query that arrives with
// our own nonce went round a loop (e.g. all port-53 traffic DNATed back to
// us); it gets SERVFAIL instead of being forwarded again. Unknown EDNS
// options are ignored by other servers (RFC 6891 section 6.1.2).
const loopOption = 65226

// forwarder sends queries to an ordered list of upstreams: UDP with EDNS0
// first, TCP when the answer is truncated, the next upstream on errors and
// timeouts. It remembers which upstream answered last and starts there.
type forwarder struct {
	addrs   []string
	timeout time.Duration
	nonce   []byte
	udp     *mdns.Client
	tcp     *mdns.Client
	next    atomic.Uint32 // index of the upstream to try first
}

func newForwarder(addrs []string, timeout time.Duration, nonce []byte) *forwarder {
	return &forwarder{
		addrs:   addrs,
		timeout: timeout,
		nonce:   nonce,
		udp:     &mdns.Client{Net: "udp", Timeout: timeout, UDPSize: upstreamUDPSize},
		tcp:     &mdns.Client{Net: "tcp", Timeout: timeout},
	}
}

var errNoUpstream = errors.New("no upstream")

// exchange forwards the question of req (only the question and the DO/CD
// bits; the client's own EDNS options are per hop) and returns the answer
// without its OPT record.
func (f *forwarder) exchange(ctx context.Context, req *mdns.Msg) (*mdns.Msg, error) {
	if f == nil || len(f.addrs) == 0 {
		return nil, errNoUpstream
	}
	q := new(mdns.Msg)
	q.Id = mdns.Id()
	q.RecursionDesired = true
	q.CheckingDisabled = req.CheckingDisabled
	q.Question = []mdns.Question{req.Question[0]}
	do := false
	if opt := req.IsEdns0(); opt != nil {
		do = opt.Do()
	}
	q.SetEdns0(upstreamUDPSize, do)
	opt := q.IsEdns0()
	// Pass on the markers of the ferries before us, so that a loop through
	// several of them is caught too (see loopHops).
	opt.Option = append(loopMarkers(req), &mdns.EDNS0_LOCAL{Code: loopOption, Data: f.nonce})

	var errs []error
	start := int(f.next.Load())
	for i := range f.addrs {
		if ctx.Err() != nil {
			errs = append(errs, ctx.Err())
			break
		}
		idx := (start + i) % len(f.addrs)
		addr := f.addrs[idx]
		r, err := f.try(ctx, q, addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", addr, err))
			continue
		}
		// SERVFAIL and REFUSED mean "ask someone else" when there is
		// someone else; the last answer is passed on as it is.
		if (r.Rcode == mdns.RcodeServerFailure || r.Rcode == mdns.RcodeRefused) && i < len(f.addrs)-1 {
			errs = append(errs, fmt.Errorf("%s: %s", addr, mdns.RcodeToString[r.Rcode]))
			continue
		}
		f.next.Store(uint32(idx))
		stripOPT(r)
		return r, nil
	}
	return nil, errors.Join(errs...)
}

func (f *forwarder) try(ctx context.Context, q *mdns.Msg, addr string) (*mdns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	r, err := exchangeOn(ctx, f.udp, q, addr)
	if err == nil && r.Truncated {
		r, err = exchangeOn(ctx, f.tcp, q, addr)
	}
	if err != nil {
		return nil, err
	}
	if !r.Response || len(r.Question) != 1 || !strings.EqualFold(r.Question[0].Name, q.Question[0].Name) ||
		r.Question[0].Qtype != q.Question[0].Qtype {
		return nil, errors.New("answer does not match the question")
	}
	return r, nil
}

// stripOPT removes OPT records; the server adds its own for the client.
func stripOPT(m *mdns.Msg) {
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
}

// maxLoopHops bounds how many DNS servers marking queries this way may
// forward one query in a row.
const maxLoopHops = 8

// loopMarkers returns the loop markers of req.
func loopMarkers(req *mdns.Msg) []mdns.EDNS0 {
	opt := req.IsEdns0()
	if opt == nil {
		return nil
	}
	var out []mdns.EDNS0
	for _, o := range opt.Option {
		if l, ok := o.(*mdns.EDNS0_LOCAL); ok && l.Code == loopOption {
			out = append(out, &mdns.EDNS0_LOCAL{Code: loopOption, Data: l.Data})
		}
	}
	return out
}

// isLoop reports whether req already went through us, or through too many
// servers that mark their queries like us.
func isLoop(req *mdns.Msg, nonce []byte) bool {
	m := loopMarkers(req)
	if len(m) >= maxLoopHops {
		return true
	}
	for _, o := range m {
		if string(o.(*mdns.EDNS0_LOCAL).Data) == string(nonce) {
			return true
		}
	}
	return false
}

// exchangeOn is Client.ExchangeContext, except that cancelling ctx (the
// server closing) interrupts a pending read instead of waiting for the
// deadline.
func exchangeOn(ctx context.Context, c *mdns.Client, q *mdns.Msg, addr string) (*mdns.Msg, error) {
	conn, err := c.DialContext(ctx, addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r, _, err := c.ExchangeWithConnContext(ctx, q, conn)
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return r, err
}
