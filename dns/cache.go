package dns

import (
	"container/list"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// cacheKey identifies a question. name is lower case; do is the DNSSEC OK
// bit, which changes what upstreams return.
type cacheKey struct {
	name   string
	qtype  uint16
	qclass uint16
	do     bool
}

type cacheEntry struct {
	key     cacheKey
	msg     *mdns.Msg // without OPT; never handed out, only copies
	stored  time.Time
	expires time.Time
	bytes   int
}

// cacheMaxBytes bounds the wire size of all cached answers together, and
// cacheMaxEntryBytes a single one: answers come back over TCP up to 64 KiB,
// and the entry bound alone would let a few thousand of those pin a lot of
// memory in a sidecar.
const (
	cacheMaxBytes      = 4 << 20
	cacheMaxEntryBytes = 16 << 10
)

// cache is a bounded LRU of forwarded answers that honours their TTLs.
type cache struct {
	mu      sync.Mutex
	size    int
	maxTTL  time.Duration
	maxNeg  time.Duration
	now     func() time.Time
	entries map[cacheKey]*list.Element
	lru     *list.List // front = most recently used
	bytes   int        // sum of the entries' bytes
}

func newCache(size int, maxTTL, maxNeg time.Duration, now func() time.Time) *cache {
	if size <= 0 {
		return nil
	}
	return &cache{size: size, maxTTL: maxTTL, maxNeg: maxNeg, now: now,
		entries: make(map[cacheKey]*list.Element), lru: list.New()}
}

// get returns a copy of a live entry with its TTLs lowered by its age.
func (c *cache) get(k cacheKey) *mdns.Msg {
	if c == nil {
		return nil
	}
	now := c.now()
	c.mu.Lock()
	el, ok := c.entries[k]
	if !ok {
		c.mu.Unlock()
		return nil
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.remove(el)
		c.mu.Unlock()
		return nil
	}
	c.lru.MoveToFront(el)
	m := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	c.mu.Unlock()
	for _, sec := range [][]mdns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
	}
	return m
}

// put stores m (which must not carry an OPT record) if it is cacheable:
// NOERROR or NXDOMAIN, not truncated, with a TTL above zero. Negative
// answers are cached for their SOA minimum (RFC 2308), capped.
func (c *cache) put(k cacheKey, m *mdns.Msg) {
	if c == nil || m.Truncated {
		return
	}
	ttl, ok := cacheTTL(m)
	if !ok {
		return
	}
	limit := c.maxTTL
	if m.Rcode == mdns.RcodeNameError || len(m.Answer) == 0 {
		limit = c.maxNeg
	}
	d := min(time.Duration(ttl)*time.Second, limit)
	if d <= 0 {
		return
	}
	size := m.Len()
	if size > cacheMaxEntryBytes {
		return
	}
	now := c.now()
	e := &cacheEntry{key: k, msg: m.Copy(), stored: now, expires: now.Add(d), bytes: size}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[k]; ok {
		c.remove(el)
	}
	c.entries[k] = c.lru.PushFront(e)
	c.bytes += size
	for c.lru.Len() > c.size || c.bytes > cacheMaxBytes {
		c.remove(c.lru.Back())
	}
}

func (c *cache) remove(el *list.Element) {
	e := el.Value.(*cacheEntry)
	c.lru.Remove(el)
	delete(c.entries, e.key)
	c.bytes -= e.bytes
}

func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// cacheTTL returns how long m may be cached in seconds: the smallest TTL
// of its records; for negative answers min(SOA TTL, SOA minimum).
func cacheTTL(m *mdns.Msg) (uint32, bool) {
	switch m.Rcode {
	case mdns.RcodeSuccess, mdns.RcodeNameError:
	default:
		return 0, false
	}
	if m.Rcode == mdns.RcodeNameError || len(m.Answer) == 0 {
		for _, rr := range m.Ns {
			if soa, ok := rr.(*mdns.SOA); ok {
				return min(soa.Hdr.Ttl, soa.Minttl), true
			}
		}
		return 0, false // no SOA: not cacheable (RFC 2308 section 5)
	}
	ttl := ^uint32(0)
	for _, sec := range [][]mdns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			if rr.Header().Rrtype == mdns.TypeOPT {
				continue
			}
			ttl = min(ttl, rr.Header().Ttl)
		}
	}
	return ttl, true
}
