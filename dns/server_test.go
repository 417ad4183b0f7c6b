package dns

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	mdns "github.com/miekg/dns"
)

func TestMeshNames(t *testing.T) {
	testkit.CheckLeaks(t)
	s := startServer(t, Config{Datacenter: "dc1", MeshTTL: 3 * time.Second})
	names := []string{
		"backend.default.svc.cluster.local.",
		"backend.other-ns.svc.cluster.local.", // OSS: every k8s namespace is Consul's default
		"BACKEND.Default.SVC.Cluster.LOCAL.",
		"backend.virtual.consul.",
		"backend.service.consul.",
		"backend.service.dc1.consul.",
		"Backend.Service.DC1.consul.",
		"backend.service.dc1.dc.consul.",
	}
	for _, netw := range []string{"udp", "tcp"} {
		for _, name := range names {
			for _, edns := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/%s/edns=%v", netw, name, edns), func(t *testing.T) {
					r := query(t, netw, s.Addr(), name, mdns.TypeA, edns)
					if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
						t.Fatalf("want one answer, got %v", r)
					}
					a, ok := r.Answer[0].(*mdns.A)
					if !ok || a.A.String() != "240.0.0.7" || a.Hdr.Ttl != 3 {
						t.Fatalf("want A 240.0.0.7 TTL 3, got %v", r.Answer[0])
					}
					if r.Question[0].Name != name {
						t.Fatalf("question case not preserved: %q", r.Question[0].Name)
					}
					if (r.IsEdns0() != nil) != edns {
						t.Fatalf("EDNS0 in answer %v, in query %v", r.IsEdns0() != nil, edns)
					}
					// AAAA of an IPv4 VIP: NODATA with a SOA for negative caching.
					r = query(t, netw, s.Addr(), name, mdns.TypeAAAA, edns)
					if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 || len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != mdns.TypeSOA {
						t.Fatalf("AAAA: want NODATA with SOA, got %v", r)
					}
				})
			}
		}
	}
	r := query(t, "udp", s.Addr(), "v6svc.virtual.consul.", mdns.TypeAAAA, false)
	if len(r.Answer) != 1 || r.Answer[0].(*mdns.AAAA).AAAA.String() != "fd00::7" {
		t.Fatalf("v6 VIP: %v", r)
	}
	if st := s.Stats(); st.Mesh != st.Queries || st.Forwarded != 0 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestNotMeshNoUpstream(t *testing.T) {
	s := startServer(t, Config{Datacenter: "dc1"})
	for _, name := range []string{
		"nosuch.default.svc.cluster.local.",
		"nosuch.virtual.consul.",
		"nosuch.service.consul.",
		"backend.service.dc2.consul.", // another datacenter's VIP is not ours
		"tag.backend.service.consul.",
		"_backend._tcp.service.consul.",
		"pod-1.default.pod.cluster.local.",
	} {
		r := query(t, "udp", s.Addr(), name, mdns.TypeA, false)
		if r.Rcode != mdns.RcodeNameError || len(r.Ns) != 1 || r.Ns[0].(*mdns.SOA).Minttl != 5 {
			t.Errorf("%s: want NXDOMAIN with SOA minimum 5, got %v", name, r)
		}
	}
	// Outside our zones with no recursor there is nobody to ask.
	if r := query(t, "udp", s.Addr(), "example.com.", mdns.TypeA, false); r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("example.com without recursors: want SERVFAIL, got %v", r)
	}
}

func TestForwarding(t *testing.T) {
	testkit.CheckLeaks(t)
	rec := startUpstream(t, answerA("198.18.9.9", 60))
	consul := startUpstream(t, answerA("198.18.8.8", 0))
	s := startServer(t, Config{Recursors: []string{rec.addr}, ConsulDNS: consul.addr, Datacenter: "dc1"})

	cases := []struct {
		name  string
		qtype uint16
		want  string // answer text fragment; "" = NXDOMAIN
		via   *fakeUpstream
	}{
		{"example.com.", mdns.TypeA, "198.18.9.9", rec},
		{"nx.example.com.", mdns.TypeA, "", rec},
		{"other.default.svc.cluster.local.", mdns.TypeA, "198.18.9.9", rec}, // k8s knows non-mesh services
		{"backend.default.svc.cluster.local.", mdns.TypeTXT, "from 198.18.9.9", rec},
		{"web.service.consul.", mdns.TypeA, "198.18.8.8", consul}, // non-mesh Consul service
		{"backend.service.consul.", mdns.TypeTXT, "from 198.18.8.8", consul},
		{"backend.connect.consul.", mdns.TypeA, "198.18.8.8", consul},
		{"nx.node.consul.", mdns.TypeA, "", consul},
		{"nosuch.virtual.consul.", mdns.TypeA, "", nil}, // VIPs are the mesh view's alone
		{"nosuch.virtual.consul.", mdns.TypeTXT, "from 198.18.8.8", consul},
	}
	for _, netw := range []string{"udp", "tcp"} {
		for _, c := range cases {
			t.Run(netw+"/"+c.name+"/"+mdns.TypeToString[c.qtype], func(t *testing.T) {
				nr, nc := rec.queries.Load(), consul.queries.Load()
				r := query(t, netw, s.Addr(), c.name, c.qtype, false)
				if c.want == "" {
					if r.Rcode != mdns.RcodeNameError {
						t.Fatalf("want NXDOMAIN, got %v", r)
					}
				} else if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 || !strings.Contains(r.Answer[0].String(), c.want) {
					t.Fatalf("want %s, got %v", c.want, r)
				}
				switch {
				case c.via == nil && (rec.queries.Load()+consul.queries.Load() != nr+nc):
					t.Fatalf("forwarded, want a local answer")
				case c.via == consul && netw == "udp" && c.via.queries.Load() == nc:
					t.Fatalf("not forwarded to the agent")
				}
				if r.IsEdns0() != nil {
					t.Fatalf("client sent no EDNS0 but got an OPT record")
				}
			})
		}
	}
	// Upstream queries carry EDNS0 with our loop marker.
	q := rec.lastQuery()
	if opt := q.IsEdns0(); opt == nil || opt.UDPSize() != upstreamUDPSize || len(loopMarkers(q)) != 1 {
		t.Fatalf("upstream query lacks EDNS0/loop marker: %v", q)
	}
}

func TestCacheHonoursTTL(t *testing.T) {
	rec := startUpstream(t, answerA("198.18.9.9", 1))
	s := startServer(t, Config{Recursors: []string{rec.addr}})
	for range 5 {
		query(t, "udp", s.Addr(), "Cached.Example.", mdns.TypeA, false)
		query(t, "udp", s.Addr(), "nx.example.", mdns.TypeA, false)
	}
	if got := rec.queries.Load(); got != 2 {
		t.Fatalf("upstream asked %d times, want 2 (positive and negative answer cached)", got)
	}
	if st := s.Stats(); st.CacheHits != 8 || st.Forwarded != 2 || st.CacheItems != 2 || st.Queries != 10 {
		t.Fatalf("stats: %+v", st)
	}
	// The positive answer's TTL is 1s: after it the upstream is asked again.
	time.Sleep(1100 * time.Millisecond)
	r := query(t, "udp", s.Addr(), "cached.example.", mdns.TypeA, false)
	if rec.queries.Load() != 3 || len(r.Answer) != 1 {
		t.Fatalf("expired answer not refreshed: %d upstream queries, %v", rec.queries.Load(), r)
	}
}

func TestTruncationRetriesOverTCP(t *testing.T) {
	many := func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool) {
		m := new(mdns.Msg)
		m.SetReply(r)
		for i := range 100 { // ~1.6 kB: more than the 1232 we advertise
			m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 30},
				A: net.IPv4(198, 18, 1, byte(i))})
		}
		if !tcp {
			m.Answer = nil
			m.Truncated = true
		}
		_ = w.WriteMsg(m)
	}
	rec := startUpstream(t, many)
	s := startServer(t, Config{Recursors: []string{rec.addr}})
	r := query(t, "tcp", s.Addr(), "big.example.", mdns.TypeA, false)
	if len(r.Answer) != 100 || rec.tcpQs.Load() != 1 {
		t.Fatalf("want 100 answers via upstream TCP, got %d (tcp queries %d)", len(r.Answer), rec.tcpQs.Load())
	}
	// A UDP client without EDNS0 gets what fits in 512 bytes and TC set.
	c := &mdns.Client{Net: "udp"}
	m := new(mdns.Msg)
	m.SetQuestion("big.example.", mdns.TypeA)
	r, _, err := c.Exchange(m, s.Addr())
	if err != nil || !r.Truncated {
		t.Fatalf("want a truncated UDP answer, got %v, %v", r, err)
	}
}

func TestFailover(t *testing.T) {
	// A UDP socket that never answers, and a TCP port that refuses.
	dead, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dead.Close() })
	failing := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg, tcp bool) {
		m := new(mdns.Msg)
		m.SetRcode(r, mdns.RcodeServerFailure)
		_ = w.WriteMsg(m)
	})
	good := startUpstream(t, answerA("198.18.9.9", 60))
	s := startServer(t, Config{Recursors: []string{dead.LocalAddr().String(), failing.addr, good.addr},
		UpstreamTimeout: 200 * time.Millisecond})
	r := query(t, "udp", s.Addr(), "example.org.", mdns.TypeA, false)
	if len(r.Answer) != 1 || failing.queries.Load() != 1 {
		t.Fatalf("failover: %v (failing upstream asked %d times)", r, failing.queries.Load())
	}
	// The upstream that answered is tried first from now on.
	query(t, "udp", s.Addr(), "example.net.", mdns.TypeA, false)
	if failing.queries.Load() != 1 || good.queries.Load() != 2 {
		t.Fatalf("answering upstream not preferred: failing %d, good %d", failing.queries.Load(), good.queries.Load())
	}
}

// TestSlowUpstreamDoesNotStall checks that queries stuck on a slow
// upstream do not delay local answers, and that MaxInflight sheds load.
func TestSlowUpstreamDoesNotStall(t *testing.T) {
	slow, release := heldUpstream(t)
	s := startServer(t, Config{Recursors: []string{slow.addr}, MaxInflight: 4, UpstreamTimeout: 10 * time.Second, QueryTimeout: 10 * time.Second})
	var wg sync.WaitGroup
	results := make(chan int, 6)
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := new(mdns.Msg).SetQuestion(fmt.Sprintf("slow%d.example.", i), mdns.TypeA)
			r, _, err := (&mdns.Client{Timeout: 10 * time.Second}).Exchange(m, s.Addr())
			if err == nil {
				results <- r.Rcode
			}
		}()
	}
	// Wait until the upstream holds the MaxInflight queries.
	deadline := time.Now().Add(5 * time.Second)
	for slow.queries.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	// And until the other two were shed: a query still on its way when
	// the upstream is released would be answered instead.
	for s.Stats().ServFail < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	// The upstream holds its queries until release: a stalled server would
	// let the client time out here.
	r := query(t, "udp", s.Addr(), "backend.virtual.consul.", mdns.TypeA, false)
	if len(r.Answer) != 1 {
		t.Fatalf("mesh answer: %v", r)
	}
	release()
	wg.Wait()
	close(results)
	var ok, servfail int
	for rc := range results {
		switch rc {
		case mdns.RcodeSuccess:
			ok++
		case mdns.RcodeServerFailure:
			servfail++
		}
	}
	if ok != 4 || servfail != 2 {
		t.Fatalf("want 4 answered and 2 shed, got %d and %d", ok, servfail)
	}
}

func TestLifecycle(t *testing.T) {
	testkit.CheckLeaks(t)
	s, err := New(Config{Mesh: testMesh(), Addr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err == nil {
		t.Fatal("second Start succeeded")
	}
	addr := s.Addr()
	query(t, "tcp", addr, "backend.virtual.consul.", mdns.TypeA, false)
	cancel() // ends the server like Close
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("still listening after ctx was cancelled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Close without Start is fine too.
	s2, _ := New(Config{Mesh: testMesh()})
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{}); err == nil {
		t.Fatal("config without Mesh accepted")
	}
	if _, err := New(Config{Mesh: testMesh(), Recursors: []string{"not an address"}}); err == nil {
		t.Fatal("bad recursor accepted")
	}
}

func TestRecursorsFromResolvConf(t *testing.T) {
	// A consul-k8s pod with DNS redirection: 127.0.0.1 (DNATed to ferry)
	// first, then kube-dns; plus entries glibc ignores.
	pod := "# comment\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 127.0.0.1\nnameserver 198.18.0.10\nnameserver bogus\n" +
		"nameserver fd00::53\noptions ndots:5\n"
	for _, tc := range []struct {
		name, conf, self, want string
	}{
		{"pod, default addr", pod, "127.0.0.1:8600", "198.18.0.10:53 [fd00::53]:53"},
		{"pod, other loopback addr", pod, "127.0.0.2:8600", "198.18.0.10:53 [fd00::53]:53"},
		{"pod, wildcard addr", pod, "0.0.0.0:8600", "198.18.0.10:53 [fd00::53]:53"},
		{"pod, bare IP", pod, "127.0.0.1", "198.18.0.10:53 [fd00::53]:53"},
		{"every loopback form", "nameserver 127.0.0.53\nnameserver ::1\nnameserver ::ffff:127.0.0.1\nnameserver 198.18.0.10\n",
			"127.0.0.1:8600", "198.18.0.10:53"},
		{"dual stack", "nameserver ::1\nnameserver 127.0.0.1\nnameserver fd00::53\n", "[::1]:8600", "[fd00::53]:53"},
		// Not on loopback: only ferry's own IP is left out; a local
		// resolver on loopback is a real recursor then.
		{"pod IP addr", "nameserver 127.0.0.53\nnameserver 198.18.0.5\nnameserver 198.18.0.10\n", "198.18.0.5:8600", "127.0.0.53:53 198.18.0.10:53"},
		{"no self", pod, "", "127.0.0.1:53 198.18.0.10:53 [fd00::53]:53"},
		{"only ferry", "nameserver 127.0.0.1\n", "127.0.0.1:8600", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "resolv.conf")
			if err := os.WriteFile(p, []byte(tc.conf), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := RecursorsFromResolvConf(p, tc.self)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("got %q, want %q", strings.Join(got, " "), tc.want)
			}
		})
	}
	if _, err := RecursorsFromResolvConf(filepath.Join(t.TempDir(), "missing"), ""); err == nil {
		t.Fatal("missing file accepted")
	}
}

// TestBurstSharesOneUpstreamQuery: identical questions asked while one is
// being forwarded wait for its answer instead of asking again.
func TestBurstSharesOneUpstreamQuery(t *testing.T) {
	slow, release := heldUpstream(t)
	// No cache: a query that came late would ask the upstream again.
	s := startServer(t, Config{Recursors: []string{slow.addr}, CacheSize: -1, UpstreamTimeout: 10 * time.Second, QueryTimeout: 10 * time.Second})
	var wg sync.WaitGroup
	answers := make(chan int, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := new(mdns.Msg).SetQuestion("burst.example.", mdns.TypeA)
			r, _, err := (&mdns.Client{Timeout: 10 * time.Second}).Exchange(m, s.Addr())
			if err == nil && r.Rcode == mdns.RcodeSuccess {
				answers <- len(r.Answer)
			}
		}()
	}
	joined := func() int32 {
		s.flightMu.Lock()
		defer s.flightMu.Unlock()
		for _, f := range s.flights {
			return f.joined.Load()
		}
		return 0
	}
	deadline := time.Now().Add(5 * time.Second)
	for joined() < 19 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	release()
	wg.Wait()
	close(answers)
	n := 0
	for a := range answers {
		if a != 1 {
			t.Fatalf("answer with %d records", a)
		}
		n++
	}
	if n != 20 || slow.queries.Load() != 1 || s.Stats().Shared != 19 {
		t.Fatalf("%d of 20 answered; upstream asked %d times, want once; stats %+v", n, slow.queries.Load(), s.Stats())
	}
}

// TestWritePrometheus: the counters in the text format /metrics serves,
// one HELP/TYPE/sample triple per family.
func TestWritePrometheus(t *testing.T) {
	rec := startUpstream(t, answerA("198.18.9.9", 60))
	s := startServer(t, Config{Recursors: []string{rec.addr}})
	query(t, "udp", s.Addr(), "backend.virtual.consul.", mdns.TypeA, false)
	for range 3 {
		query(t, "udp", s.Addr(), "www.example.", mdns.TypeA, false)
	}
	var b strings.Builder
	s.WritePrometheus(&b)
	out := b.String()
	for _, want := range []string{
		"# TYPE ferry_dns_queries_total counter\nferry_dns_queries_total 4\n",
		"ferry_dns_mesh_answers_total 1\n",
		"ferry_dns_cache_hits_total 2\n",
		"ferry_dns_upstream_exchanges_total 1\n",
		"ferry_dns_servfail_total 0\n",
		"# TYPE ferry_dns_cache_entries gauge\nferry_dns_cache_entries 1\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "# HELP "); n != 8 || strings.Count(out, "# TYPE ") != 8 {
		t.Errorf("%d families, want 8:\n%s", n, out)
	}
}

// dcMesh is a mesh view that learns its datacenter later, like the
// sidecar's catalog view.
type dcMesh struct {
	*fakeMesh
	dc atomic.Pointer[string]
}

func (m *dcMesh) Datacenter() string {
	if p := m.dc.Load(); p != nil {
		return *p
	}
	return ""
}

// TestDatacenterFromView: with Config.Datacenter unset, <svc>.service.<dc>
// names are mesh names once the view knows the datacenter.
func TestDatacenterFromView(t *testing.T) {
	m := &dcMesh{fakeMesh: testMesh()}
	s := startServer(t, Config{Mesh: m})
	if r := query(t, "udp", s.Addr(), "backend.service.dc1.consul.", mdns.TypeA, false); len(r.Answer) != 0 {
		t.Fatalf("datacenter unknown yet, but answered: %v", r)
	}
	dc := "DC1"
	m.dc.Store(&dc)
	r := query(t, "udp", s.Addr(), "backend.service.dc1.consul.", mdns.TypeA, false)
	if len(r.Answer) != 1 || r.Answer[0].(*mdns.A).A.String() != "240.0.0.7" {
		t.Fatalf("want the VIP once the view knows dc1, got %v", r)
	}
}
