package intentions

import "sync"

// Decider is anything that decides a source; *Evaluator and *Watcher are.
type Decider interface {
	Decide(Source) Decision
}

// Tracker holds the live inbound connections by source so that a change of
// intentions can close the ones that are no longer allowed. Registering costs
// a couple of small allocations and a mutex; there is no goroutine per
// connection.
type Tracker struct {
	mu     sync.Mutex
	groups map[Source]map[*tracked]struct{}
	n      int
}

type tracked struct {
	src   Source
	close func()
}

// Revoked reports the connections Revoke closed for one source.
type Revoked struct {
	Source   Source
	Conns    int
	Decision Decision
}

// NewTracker returns an empty Tracker.
func NewTracker() *Tracker {
	return &Tracker{groups: map[Source]map[*tracked]struct{}{}}
}

// Track registers a live connection from src. closeFn is called at most once,
// by Revoke, when src becomes denied; it must not block (close the raw
// socket, or a conn whose close does not wait on the peer). The returned
// untrack func must be called when the connection ends; it is idempotent and
// harmless after a revocation.
func (t *Tracker) Track(src Source, closeFn func()) (untrack func()) {
	src = normalize(src)
	c := &tracked{src: src, close: closeFn}
	t.mu.Lock()
	g := t.groups[src]
	if g == nil {
		g = map[*tracked]struct{}{}
		t.groups[src] = g
	}
	g[c] = struct{}{}
	t.n++
	t.mu.Unlock()
	return func() { t.untrack(c) }
}

func (t *Tracker) untrack(c *tracked) {
	t.mu.Lock()
	defer t.mu.Unlock()
	g := t.groups[c.src]
	if _, ok := g[c]; !ok {
		return // already untracked or revoked
	}
	delete(g, c)
	t.n--
	if len(g) == 0 {
		delete(t.groups, c.src)
	}
}

// Len is the number of tracked connections.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

// Revoke decides every tracked source with d (once per distinct source),
// closes the connections of the denied ones and forgets them. The close
// funcs run after the lock is released, in the caller's goroutine.
func (t *Tracker) Revoke(d Decider) []Revoked {
	var (
		out    []Revoked
		closes []func()
	)
	t.mu.Lock()
	for src, g := range t.groups {
		dec := d.Decide(src)
		if dec.Allow {
			continue
		}
		out = append(out, Revoked{Source: src, Conns: len(g), Decision: dec})
		for c := range g {
			closes = append(closes, c.close)
		}
		t.n -= len(g)
		delete(t.groups, src)
	}
	t.mu.Unlock()
	for _, f := range closes {
		f()
	}
	return out
}

// normalize makes "" and "default" the same group key.
func normalize(s Source) Source {
	s.Namespace = nsOrDefault(s.Namespace)
	if isDefault(s.Partition) {
		s.Partition = defaultName
	}
	return s
}
