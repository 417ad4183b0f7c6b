package dns

import (
	"fmt"
	"net"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func aMsg(name string, ttl uint32) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, mdns.TypeA)
	m.Response = true
	m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: ttl}, A: net.IPv4(198, 18, 0, 1)}}
	return m
}

func TestCache(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	c := newCache(3, time.Minute, 10*time.Second, clk.now)
	k := func(n string) cacheKey { return cacheKey{name: n, qtype: mdns.TypeA, qclass: mdns.ClassINET} }

	c.put(k("a."), aMsg("a.", 30))
	clk.t = clk.t.Add(10 * time.Second)
	m := c.get(k("a."))
	if m == nil || m.Answer[0].Header().Ttl != 20 {
		t.Fatalf("want TTL lowered to 20, got %v", m)
	}
	m.Answer[0].Header().Ttl = 999 // copies only
	if c.get(k("a.")).Answer[0].Header().Ttl != 20 {
		t.Fatal("cache handed out its own message")
	}
	clk.t = clk.t.Add(20 * time.Second)
	if c.get(k("a.")) != nil {
		t.Fatal("expired entry returned")
	}

	// Capped by maxTTL.
	c.put(k("long."), aMsg("long.", 86400))
	clk.t = clk.t.Add(61 * time.Second)
	if c.get(k("long.")) != nil {
		t.Fatal("entry outlived maxTTL")
	}

	// Not cached: TTL 0, SERVFAIL, truncated, negative without SOA.
	c.put(k("zero."), aMsg("zero.", 0))
	sf := aMsg("sf.", 30)
	sf.Rcode = mdns.RcodeServerFailure
	c.put(k("sf."), sf)
	tc := aMsg("tc.", 30)
	tc.Truncated = true
	c.put(k("tc."), tc)
	nx := new(mdns.Msg)
	nx.Rcode = mdns.RcodeNameError
	c.put(k("nosoa."), nx)
	if c.len() != 0 {
		t.Fatalf("uncacheable answers cached: %d entries", c.len())
	}

	// Negative: SOA minimum, capped by maxNeg.
	nx.Ns = []mdns.RR{soa("example.", 300, 5)}
	c.put(k("nx5."), nx)
	nx2 := nx.Copy()
	nx2.Ns = []mdns.RR{soa("example.", 300, 3600)}
	c.put(k("nxlong."), nx2)
	clk.t = clk.t.Add(6 * time.Second)
	if c.get(k("nx5.")) != nil || c.get(k("nxlong.")) == nil {
		t.Fatal("negative TTL not the SOA minimum")
	}
	clk.t = clk.t.Add(5 * time.Second)
	if c.get(k("nxlong.")) != nil {
		t.Fatal("negative entry outlived maxNeg")
	}

	// Bounded: the least recently used goes first.
	for i := range 3 {
		c.put(k(fmt.Sprint(i)), aMsg("x.", 30))
	}
	c.get(k("0"))
	c.put(k("3"), aMsg("x.", 30))
	if c.len() != 3 || c.get(k("1")) != nil || c.get(k("0")) == nil {
		t.Fatalf("LRU bound broken: %d entries", c.len())
	}
	// Bounded in bytes too.
	big := func(n int) *mdns.Msg {
		m := aMsg("big.", 30)
		for i := range n {
			m.Answer = append(m.Answer, &mdns.TXT{Hdr: mdns.RR_Header{Name: "big.", Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: 30},
				Txt: []string{fmt.Sprintf("%0200d", i)}})
		}
		return m
	}
	c.put(k("huge."), big(100)) // ~20 KB
	if c.get(k("huge.")) != nil {
		t.Fatal("oversized answer cached")
	}
	bc := newCache(10000, time.Minute, time.Minute, clk.now)
	for i := range 1000 {
		bc.put(k(fmt.Sprint(i)), big(40)) // ~8 KB each
	}
	if bc.bytes > cacheMaxBytes || bc.len() == 0 || bc.len() == 1000 {
		t.Fatalf("byte bound: %d bytes in %d entries", bc.bytes, bc.len())
	}
	var nilCache *cache
	nilCache.put(k("a."), aMsg("a.", 30))
	if nilCache.get(k("a.")) != nil {
		t.Fatal("disabled cache returned something")
	}
}
