package dns

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/hashicorp/go-hclog"
	mdns "github.com/miekg/dns"
)

// fakeMesh is a MeshView backed by a map.
type fakeMesh struct {
	mu   sync.Mutex
	vips map[string]netip.Addr
}

func (f *fakeMesh) VirtualIP(svc string) (netip.Addr, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.vips[svc]
	return a, ok
}

func testMesh() *fakeMesh {
	return &fakeMesh{vips: map[string]netip.Addr{
		"backend": netip.MustParseAddr("240.0.0.7"),
		"v6svc":   netip.MustParseAddr("fd00::7"),
	}}
}

// fakeUpstream is a tiny DNS server on 127.0.0.1 (UDP and TCP, same port)
// answering with handle; it records what it was asked.
type fakeUpstream struct {
	addr    string
	handle  func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool)
	queries atomic.Int64
	tcpQs   atomic.Int64
	mu      sync.Mutex
	last    *mdns.Msg
}

// heldUpstream answers every query with 198.18.9.9, but only once release
// is called (at the latest when the test ends).
func heldUpstream(t testing.TB) (up *fakeUpstream, release func()) {
	t.Helper()
	held := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release)
	up = startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool) {
		<-held
		answerA("198.18.9.9", 60)(w, r, tcp)
	})
	return up, release
}

func startUpstream(t testing.TB, handle func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool)) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{handle: handle}
	pc, ln, err := listenBoth("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.addr = pc.LocalAddr().String()
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		_, tcp := w.RemoteAddr().(*net.TCPAddr)
		u.queries.Add(1)
		if tcp {
			u.tcpQs.Add(1)
		}
		u.mu.Lock()
		u.last = r.Copy()
		u.mu.Unlock()
		u.handle(w, r, tcp)
	})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // runs after the Shutdowns registered below
	for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		wg.Add(1)
		go func() { defer wg.Done(); _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return u
}

func (u *fakeUpstream) lastQuery() *mdns.Msg {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.last
}

// answerA answers every A query with ip and the given TTL, NXDOMAIN (with
// SOA) for names starting with "nx".
func answerA(ip string, ttl uint32) func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool) {
	return func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool) {
		m := new(mdns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		switch {
		case len(q.Name) > 2 && q.Name[:2] == "nx":
			m.Rcode = mdns.RcodeNameError
			m.Ns = []mdns.RR{soa("example.", 60, 30)}
		case q.Qtype == mdns.TypeA:
			m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: ttl}, A: net.ParseIP(ip)}}
		case q.Qtype == mdns.TypeTXT:
			m.Answer = []mdns.RR{&mdns.TXT{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: ttl}, Txt: []string{"from " + ip}}}
		}
		if opt := r.IsEdns0(); opt != nil {
			m.SetEdns0(opt.UDPSize(), false)
		}
		_ = w.WriteMsg(m)
	}
}

func soa(zone string, ttl, minttl uint32) *mdns.SOA {
	return &mdns.SOA{Hdr: mdns.RR_Header{Name: zone, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: ttl},
		Ns: "ns." + zone, Mbox: "h." + zone, Serial: 1, Refresh: 1, Retry: 1, Expire: 1, Minttl: minttl}
}

// startServer starts a Server on a free loopback port.
func startServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Mesh == nil {
		cfg.Mesh = testMesh()
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testkit.LogWriter{T: t}})
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// query asks addr over netw ("udp" or "tcp").
func query(t testing.TB, netw, addr, name string, qtype uint16, edns bool) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(1232, false)
	}
	c := &mdns.Client{Net: netw, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s %s %s: %v", netw, name, mdns.TypeToString[qtype], err)
	}
	return r
}
