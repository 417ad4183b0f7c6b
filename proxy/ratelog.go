package proxy

import (
	"sync"
	"time"
)

// Per-connection failures (a denied client retrying in a loop, a dead
// upstream every app request dials) would otherwise write one WARN line per
// connection: thousands per second that bury everything else and cost more
// CPU than the refusals themselves. The metrics still count every event;
// the log says each kind of failure once per interval, with how many of
// the same were left out since.
const (
	logInterval = 10 * time.Second
	logMaxKeys  = 1024 // distinct keys tracked; beyond it old ones are dropped
)

// rateLog decides which of a stream of repeated events to log.
type rateLog struct {
	interval time.Duration
	now      func() time.Time

	mu   sync.Mutex
	keys map[string]*logKey
}

type logKey struct {
	last       time.Time
	suppressed int
}

func newRateLog(interval time.Duration, now func() time.Time) *rateLog {
	if now == nil {
		now = time.Now
	}
	return &rateLog{interval: interval, now: now, keys: map[string]*logKey{}}
}

// allow reports whether an event of this key should be logged now, and how
// many events of the key were not logged since the last one that was.
func (r *rateLog) allow(key string) (ok bool, suppressed int) {
	if r == nil {
		return true, 0
	}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	k := r.keys[key]
	if k == nil {
		if len(r.keys) >= logMaxKeys {
			r.evict(now)
		}
		r.keys[key] = &logKey{last: now}
		return true, 0
	}
	if now.Sub(k.last) < r.interval {
		k.suppressed++
		return false, 0
	}
	n := k.suppressed
	k.last, k.suppressed = now, 0
	return true, n
}

// evict drops keys quiet for an interval (their suppressed counts are zero
// or stale), or every key if all are recent: a flood of distinct keys then
// gets logged a little more, never tracked without bound.
func (r *rateLog) evict(now time.Time) {
	for key, k := range r.keys {
		if now.Sub(k.last) >= r.interval {
			delete(r.keys, key)
		}
	}
	if len(r.keys) >= logMaxKeys {
		clear(r.keys)
	}
}
