package dns

import "sync/atomic"

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
