package dns

import (
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	mdns "github.com/miekg/dns"
)

func TestBadQueries(t *testing.T) {
	rec := startUpstream(t, answerA("198.18.9.9", 60))
	s := startServer(t, Config{Recursors: []string{rec.addr}})
	ask := func(m *mdns.Msg) *mdns.Msg {
		t.Helper()
		r, _, err := (&mdns.Client{Net: "udp", Timeout: 2 * time.Second}).Exchange(m, s.Addr())
		if err != nil {
			t.Fatalf("%v: %v", m.Question, err)
		}
		return r
	}
	for _, qt := range []uint16{mdns.TypeANY, mdns.TypeAXFR, mdns.TypeIXFR} {
		m := new(mdns.Msg)
		m.SetQuestion("backend.virtual.consul.", qt)
		if r := ask(m); r.Rcode != mdns.RcodeNotImplemented || len(r.Answer) != 0 {
			t.Errorf("%s: want NOTIMP, got %v", mdns.TypeToString[qt], r)
		}
	}
	m := new(mdns.Msg)
	m.SetQuestion("version.bind.", mdns.TypeTXT)
	m.Question[0].Qclass = mdns.ClassCHAOS
	if r := ask(m); r.Rcode != mdns.RcodeNotImplemented {
		t.Errorf("CHAOS: want NOTIMP, got %v", r)
	}
	m = new(mdns.Msg)
	m.SetNotify("example.")
	if r := ask(m); r.Rcode != mdns.RcodeNotImplemented {
		t.Errorf("NOTIFY: want NOTIMP, got %v", r)
	}
	m = new(mdns.Msg)
	m.SetQuestion("example.", mdns.TypeA)
	m.SetEdns0(1232, false)
	m.IsEdns0().SetVersion(1)
	if r := ask(m); r.Rcode != mdns.RcodeBadVers {
		t.Errorf("EDNS version 1: want BADVERS, got %v", r)
	}
	if rec.queries.Load() != 0 {
		t.Errorf("bad queries reached the upstream")
	}
}

// TestGarbage throws malformed datagrams and TCP streams at the server and
// checks that it keeps answering.
func TestGarbage(t *testing.T) {
	testkit.CheckLeaks(t)
	s := startServer(t, Config{})
	conn, err := net.Dial("udp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rnd := rand.New(rand.NewPCG(1, 2))
	valid, _ := new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeA).Pack()
	for i := range 3000 {
		var b []byte
		switch i % 5 {
		case 0:
			b = make([]byte, rnd.IntN(12)) // shorter than a header, even empty
		case 1:
			b = make([]byte, rnd.IntN(1500))
			for j := range b {
				b[j] = byte(rnd.Uint32())
			}
		case 2: // a valid query, cut short or with bytes flipped
			b = append([]byte(nil), valid[:rnd.IntN(len(valid))]...)
		case 3:
			b = append([]byte(nil), valid...)
			b[rnd.IntN(len(b))] ^= byte(1 + rnd.IntN(255))
		case 4:
			b = make([]byte, 9000) // bigger than the read buffer
		}
		_, _ = conn.Write(b)
	}
	// TCP: a zero length, a huge length with nothing behind it, a garbage body.
	for _, b := range [][]byte{{0, 0}, {0xff, 0xff, 1, 2, 3}, append([]byte{0, 20}, make([]byte, 20)...)} {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write(b)
		defer c.Close()
	}
	// The flood can overflow the socket's receive queue, so the first query
	// after it may be dropped by the kernel; resolvers retry, and so do we.
	for _, netw := range []string{"udp", "tcp"} {
		m := new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeA)
		var r *mdns.Msg
		for try := 0; try < 5 && r == nil; try++ {
			r, _, err = (&mdns.Client{Net: netw, Timeout: time.Second}).Exchange(m, s.Addr())
		}
		if r == nil || len(r.Answer) != 1 {
			t.Fatalf("%s after garbage: %v, %v", netw, r, err)
		}
	}
	// Answers are never answered. A fresh socket: the garbage socket may
	// still get FORMERR replies to the flood.
	m := new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeA)
	m.Response = true
	b, _ := m.Pack()
	fresh, err := net.Dial("udp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	_, _ = fresh.Write(b)
	// Then a query on the same socket: only its answer may come back.
	qm := new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeA)
	qm.Id = m.Id + 1
	q, _ := qm.Pack()
	_, _ = fresh.Write(q)
	buf := make([]byte, 2048)
	answered := false
	for {
		wait := 5 * time.Second
		if answered {
			wait = 200 * time.Millisecond // a late reply to the response packet
		}
		_ = fresh.SetReadDeadline(time.Now().Add(wait))
		n, err := fresh.Read(buf)
		if err != nil {
			if !answered {
				t.Fatalf("query not answered: %v", err)
			}
			break
		}
		got := new(mdns.Msg)
		if err := got.Unpack(buf[:n]); err != nil || got.Id != qm.Id {
			t.Fatalf("a response packet was answered: %v %v", got, err)
		}
		answered = true
	}
}

// TestLoop points two servers at each other: the query must fail fast
// with SERVFAIL instead of bouncing until timeouts.
func TestLoop(t *testing.T) {
	pa, la, err := listenBoth("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addrA := pa.LocalAddr().String()
	pa.Close()
	la.Close()
	// Timeouts far above the client's (5s): only loop detection answers in time.
	b := startServer(t, Config{Recursors: []string{addrA}, UpstreamTimeout: time.Minute, QueryTimeout: time.Minute})
	a := startServer(t, Config{Addr: addrA, Recursors: []string{b.Addr()}, UpstreamTimeout: time.Minute, QueryTimeout: time.Minute})
	r := query(t, "udp", a.Addr(), "loop.example.", mdns.TypeA, false)
	if r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("want SERVFAIL, got %v", r.Rcode)
	}
	if a.Stats().Loops != 1 || a.Stats().ServFail != 2 { // the looped query and the client's
		t.Fatalf("stats: %+v", a.Stats())
	}
	// A server never forwards to its own address.
	self, err := New(Config{Mesh: testMesh(), Addr: "127.0.0.1:8600", Recursors: []string{"127.0.0.1:8600", "198.18.0.1"}})
	if err != nil || len(self.cfg.Recursors) != 1 || self.cfg.Recursors[0] != "198.18.0.1:53" {
		t.Fatalf("own address not dropped: %v %v", self.cfg.Recursors, err)
	}
}
