package catalog

import (
	"math/rand/v2"
	"time"
)

// pick chooses the next instance to dial among those not yet tried by this
// Dial. The policy is two choices with least open connections, where the
// first choice is the round-robin successor rather than a random one:
//   - short sequential connections (all counts 0) then spread exactly evenly
//     (pure random two-choice would give binomial spread: 40 picks over two
//     instances land 14/26 or worse about 8% of the time);
//   - long-lived connections steer away from a loaded or slow instance, as
//     least-connections does, without the herd effect of every sidecar
//     picking the same global minimum;
//   - cost is O(1) without allocation when few instances are backed off
//     (BenchmarkPick: ~25-60 ns).
//
// Instances backed off after a failed dial are skipped while any other
// untried instance is available; if all are backed off the one whose backoff
// ends first is tried, since a possibly-dead instance beats a certain failure.
func (w *instWatch) pick(tried map[*instState]bool, now time.Time) *instState {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.insts)
	if n == 0 {
		return nil
	}
	ok := func(s *instState) bool { return !tried[s] && !now.Before(s.failUntil) }
	// First choice: the round-robin successor, skipping ineligible ones.
	start := int(w.rr % uint64(n))
	w.rr++
	ai := -1
	for k := range n {
		if i := (start + k) % n; ok(w.insts[i]) {
			ai = i
			break
		}
	}
	if ai < 0 {
		var best *instState
		for _, s := range w.insts {
			if !tried[s] && (best == nil || s.failUntil.Before(best.failUntil)) {
				best = s
			}
		}
		return best
	}
	a := w.insts[ai]
	// Second choice: the first eligible instance from a random start.
	if n == 1 {
		return a
	}
	off := 1 + rand.N(n-1)
	for k := range n - 1 {
		i := (ai + off + k) % n
		if i == ai {
			continue
		}
		if b := w.insts[i]; ok(b) {
			if b.active.Load() < a.active.Load() {
				return b
			}
			break
		}
	}
	return a
}

// failed keeps s out of rotation for a backoff that doubles with each
// consecutive failure.
func (w *instWatch) failed(s *instState, now time.Time, base, max time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s.fails++
	d := base
	for i := 1; i < s.fails && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	s.failUntil = now.Add(d)
}

func (w *instWatch) succeeded(s *instState) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s.fails = 0
	s.failUntil = time.Time{}
}
