package dns

import (
	"fmt"
	"io"
	"sync/atomic"
)

// Stats counts what the server did since it was created, for metrics.
type Stats struct {
	Queries    uint64 // queries handled (after the header filter)
	Mesh       uint64 // answered from the mesh view (VIP or NODATA)
	CacheHits  uint64 // forwarded names answered from the cache
	Forwarded  uint64 // exchanges with an upstream (recursor or agent)
	Shared     uint64 // queries that waited for an identical one in flight
	ServFail   uint64 // SERVFAIL answers: upstream failure, overload, loop
	Loops      uint64 // queries refused as forwarding loops
	CacheItems int    // entries in the cache now
}

type counters struct {
	queries, mesh, cacheHits, forwarded, shared, servFail, loops atomic.Uint64
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Queries:   s.stats.queries.Load(),
		Mesh:      s.stats.mesh.Load(),
		CacheHits: s.stats.cacheHits.Load(),
		Forwarded: s.stats.forwarded.Load(),
		Shared:    s.stats.shared.Load(),
		ServFail:  s.stats.servFail.Load(),
		Loops:     s.stats.loops.Load(),
	}
	if s.cache != nil {
		st.CacheItems = s.cache.len()
	}
	return st
}

// WritePrometheus writes the counters in the Prometheus text format
// (0.0.4), so the server can join the sidecar's /metrics (it satisfies
// proxy.Collector without this package importing proxy).
func (s *Server) WritePrometheus(w io.Writer) {
	st := s.Stats()
	for _, m := range []struct {
		name, typ, help string
		v               uint64
	}{
		{"ferry_dns_queries_total", "counter", "DNS queries handled.", st.Queries},
		{"ferry_dns_mesh_answers_total", "counter", "DNS queries answered from the mesh view (virtual IP or NODATA).", st.Mesh},
		{"ferry_dns_cache_hits_total", "counter", "Forwarded DNS names answered from the cache.", st.CacheHits},
		{"ferry_dns_upstream_exchanges_total", "counter", "DNS exchanges with an upstream (recursor or Consul agent).", st.Forwarded},
		{"ferry_dns_shared_total", "counter", "DNS queries that waited for an identical one in flight.", st.Shared},
		{"ferry_dns_servfail_total", "counter", "SERVFAIL answers (upstream failure, overload, loop).", st.ServFail},
		{"ferry_dns_loops_total", "counter", "DNS queries refused as forwarding loops.", st.Loops},
		{"ferry_dns_cache_entries", "gauge", "Forwarded answers in the DNS cache.", uint64(st.CacheItems)},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %d\n", m.name, m.help, m.name, m.typ, m.name, m.v)
	}
}
