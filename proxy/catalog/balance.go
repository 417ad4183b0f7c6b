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
//   - cost is O(1) counters per pick plus one pass to skip backed-off ones.
//
// Instances backed off after a failed dial are skipped while any other
// untried instance is available; if all are backed off the one whose backoff
// ends first is tried, since a possibly-dead instance beats a certain failure.
func (w *instWatch) pick(tried map[*instState]bool, now time.Time) *instState {
	w.mu.Lock()
	defer w.mu.Unlock()
	var buf [16]*instState
	cands := buf[:0]
	for _, s := range w.insts {
		if !tried[s] && !now.Before(s.failUntil) {
			cands = append(cands, s)
		}
	}
	if len(cands) == 0 {
		var best *instState
		for _, s := range w.insts {
			if !tried[s] && (best == nil || s.failUntil.Before(best.failUntil)) {
				best = s
			}
		}
		return best
	}
	i := int(w.rr % uint64(len(cands)))
	w.rr++
	a := cands[i]
	if len(cands) == 1 {
		return a
	}
	j := rand.N(len(cands) - 1)
	if j >= i {
		j++
	}
	if b := cands[j]; b.active.Load() < a.active.Load() {
		return b
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
