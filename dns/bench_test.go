package dns

import (
	"testing"

	mdns "github.com/miekg/dns"
)

// Queries per second over real loopback UDP, one client socket per
// goroutine (b.RunParallel). Reported as ns/op; qps = 1e9 / ns/op.
//
//	go test -run '^$' -bench . -benchtime 1s ./dns
func benchQueries(b *testing.B, s *Server, name string) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		c := &mdns.Client{Net: "udp"}
		conn, err := c.Dial(s.Addr())
		if err != nil {
			b.Error(err)
			return
		}
		defer conn.Close()
		m := new(mdns.Msg).SetQuestion(name, mdns.TypeA)
		for pb.Next() {
			r, _, err := c.ExchangeWithConn(m, conn)
			if err != nil || len(r.Answer) != 1 {
				b.Errorf("%v %v", r, err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}

func BenchmarkMeshName(b *testing.B) {
	s := startServer(b, Config{})
	benchQueries(b, s, "backend.default.svc.cluster.local.")
}

func BenchmarkCachedForwardedName(b *testing.B) {
	rec := startUpstream(b, answerA("198.18.9.9", 3600))
	s := startServer(b, Config{Recursors: []string{rec.addr}})
	benchQueries(b, s, "www.example.com.")
	if n := rec.queries.Load(); n != 1 {
		b.Fatalf("upstream asked %d times, want 1 (cached)", n)
	}
}
