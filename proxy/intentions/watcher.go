package intentions

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Defaults for Config.
const (
	DefaultMinBackoff = 250 * time.Millisecond
	DefaultMaxBackoff = 10 * time.Second
	// stillFailingEvery bounds how often a continuing outage is logged.
	stillFailingEvery = 30 * time.Second
)

// Config configures a Watcher.
type Config struct {
	// Destination is the local service whose inbound connections are
	// authorized; used in logs.
	Destination string
	// Fetch returns the intentions (blocking on index). Use ConsulFetcher.
	Fetch FetchFunc
	// Logger; nil discards.
	Logger hclog.Logger
	// DisableRevocation turns off closing live connections whose source
	// becomes denied; Admit then only decides.
	DisableRevocation bool
	// MinBackoff and MaxBackoff bound the retry delay after a failed fetch
	// (exponential with jitter). Zero means the defaults.
	MinBackoff, MaxBackoff time.Duration
}

// Stats is a point-in-time view for metrics and the admin endpoint.
type Stats struct {
	Loaded       bool
	Index        uint64 // index of the last successful fetch
	Intentions   int    // intentions in the current evaluator
	DefaultAllow bool
	// DefaultSource is where DefaultAllow came from (Snapshot.DefaultSource).
	DefaultSource string
	Updates       uint64 // evaluator swaps, including the first load
	FetchErrors   uint64
	Failing       bool   // the last fetch failed
	Revoked       uint64 // live connections closed by revocation
	Tracked       int    // live connections tracked for revocation
}

// Watcher keeps the Evaluator of one destination current. Decide and Admit
// are safe for concurrent use and never block on the agent.
type Watcher struct {
	cfg     Config
	log     hclog.Logger
	tracker *Tracker // nil when revocation is disabled

	ev    atomic.Pointer[Evaluator]
	ready chan struct{}

	index, updates, fetchErrors, revoked atomic.Uint64
	failing                              atomic.Bool
	defaultSource                        atomic.Pointer[string]
	defaultNote                          string // last logged Snapshot.DefaultNote; run goroutine only

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// Watch starts watching; it returns at once. Decisions fail closed until
// Ready is closed. Stop it with Close (or by cancelling ctx).
func Watch(ctx context.Context, cfg Config) (*Watcher, error) {
	if cfg.Fetch == nil {
		return nil, errors.New("intentions: Config.Fetch is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(DefaultMaxBackoff, cfg.MinBackoff)
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Watcher{
		cfg:    cfg,
		log:    cfg.Logger.With("destination", cfg.Destination),
		ready:  make(chan struct{}),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	if !cfg.DisableRevocation {
		w.tracker = NewTracker()
	}
	go w.run(ctx)
	return w, nil
}

// Close stops the watch and waits for it. Idempotent.
func (w *Watcher) Close() error {
	w.closeOnce.Do(func() {
		w.cancel()
		<-w.done
	})
	return nil
}

// Ready is closed once the first list of intentions is loaded.
func (w *Watcher) Ready() <-chan struct{} { return w.ready }

// Loaded reports whether a list of intentions has been loaded.
func (w *Watcher) Loaded() bool { return w.ev.Load() != nil }

// Evaluator returns the current evaluator, nil before the first load.
func (w *Watcher) Evaluator() *Evaluator { return w.ev.Load() }

// Decide decides src with the current intentions; before the first load it
// fails closed.
func (w *Watcher) Decide(src Source) Decision {
	if ev := w.ev.Load(); ev != nil {
		return ev.Decide(src)
	}
	return NotLoaded()
}

// Admit decides an inbound connection from src and, when allowed and
// revocation is on, tracks it so that a later change denying src calls
// closeFn (see Tracker.Track for its contract). Call done when the
// connection ends; it is never nil. A denied connection is not tracked.
//
// The connection is registered before the decision is read, so a change
// that lands in between is either seen here or revoked by the watcher.
func (w *Watcher) Admit(src Source, closeFn func()) (d Decision, done func()) {
	if w.tracker == nil {
		return w.Decide(src), noop
	}
	untrack := w.tracker.Track(src, closeFn)
	d = w.Decide(src)
	if !d.Allow {
		untrack()
		return d, noop
	}
	return d, untrack
}

func noop() {}

// Stats returns counters for metrics.
func (w *Watcher) Stats() Stats {
	s := Stats{
		Index:       w.index.Load(),
		Updates:     w.updates.Load(),
		FetchErrors: w.fetchErrors.Load(),
		Failing:     w.failing.Load(),
		Revoked:     w.revoked.Load(),
	}
	if ev := w.ev.Load(); ev != nil {
		s.Loaded, s.Intentions, s.DefaultAllow = true, ev.Len(), ev.DefaultAllow()
	}
	if src := w.defaultSource.Load(); src != nil {
		s.DefaultSource = *src
	}
	if w.tracker != nil {
		s.Tracked = w.tracker.Len()
	}
	return s
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	var (
		index        uint64
		failures     int
		failingSince time.Time
		lastLogged   time.Time
	)
	for {
		start := time.Now()
		snap, err := w.cfg.Fetch(ctx, index)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			w.fetchErrors.Add(1)
			w.failing.Store(true)
			now := time.Now()
			switch {
			case failures == 1:
				failingSince, lastLogged = now, now
				if w.Loaded() {
					w.log.Error("cannot fetch intentions; deciding from the last known list", "index", w.index.Load(), "error", err)
				} else {
					w.log.Error("cannot fetch intentions; denying all inbound connections until loaded", "error", err)
				}
			case now.Sub(lastLogged) >= stillFailingEvery:
				lastLogged = now
				w.log.Warn("still cannot fetch intentions", "failures", failures,
					"since", failingSince.Format(time.RFC3339), "loaded", w.Loaded(), "error", err)
			default:
				w.log.Debug("fetch intentions failed", "failures", failures, "error", err)
			}
			// The agent may come back restarted with a lower index, and a
			// blocking query at our old index would then sleep for the
			// whole wait: ask without an index first.
			index = 0
			if !sleep(ctx, w.backoff(failures)) {
				return
			}
			continue
		}
		if failures > 0 {
			w.log.Info("intentions fetch recovered", "failures", failures,
				"outage", time.Since(failingSince).Round(time.Millisecond), "index", snap.Index)
			failures = 0
			w.failing.Store(false)
		}

		next := snap.Index
		if next < index {
			// The agent's state went back (restart, snapshot restore):
			// start over with a non-blocking fetch.
			w.log.Debug("intentions index went backwards; resetting", "was", index, "now", snap.Index)
			next = 0
		}
		w.apply(snap)
		// Guard against a tight loop when the index makes no progress
		// (an endpoint returning early or index 0). A real change moves
		// the index, so this never delays one.
		if next == index && time.Since(start) < w.cfg.MinBackoff {
			if !sleep(ctx, w.cfg.MinBackoff) {
				return
			}
		}
		index = next
	}
}

// apply swaps in the evaluator for snap if it decides differently from the
// current one, then revokes live connections it now denies.
func (w *Watcher) apply(snap Snapshot) {
	w.index.Store(snap.Index)
	src := snap.DefaultSource
	if src == "" {
		src = DefaultFromTest
	}
	w.defaultSource.Store(&src)
	if snap.DefaultNote != w.defaultNote {
		w.defaultNote = snap.DefaultNote
		if snap.DefaultNote != "" {
			w.log.Warn("default intention policy: "+snap.DefaultNote, "default", policyName(snap.DefaultAllow), "default_source", src)
		}
	}
	ev := NewEvaluator(snap.Intentions, snap.DefaultAllow)
	old := w.ev.Load()
	if ev.Equal(old) {
		return
	}
	w.ev.Store(ev)
	w.updates.Add(1)
	msg := "intentions updated"
	if old == nil {
		msg = "intentions loaded"
		close(w.ready)
	}
	w.log.Info(msg, "index", snap.Index, "intentions", ev.Len(), "default", policyName(ev.DefaultAllow()), "default_source", src)
	for _, d := range ev.L7() {
		w.log.Warn("intention has L7 permissions; ferry enforces L4 only and treats it as deny", "intention", d)
	}
	if w.tracker == nil {
		return
	}
	for _, r := range w.tracker.Revoke(ev) {
		w.revoked.Add(uint64(r.Conns))
		w.log.Info("revoked live connections", "source", r.Source.String(), "conns", r.Conns,
			"reason", r.Decision.Reason, "intention", r.Decision.Intention)
	}
}

func (w *Watcher) backoff(failures int) time.Duration {
	d := w.cfg.MinBackoff
	for i := 1; i < failures && d < w.cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, w.cfg.MaxBackoff)
	// Jitter in [d/2, d] so a fleet of sidecars does not retry in lockstep.
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func policyName(allow bool) string {
	if allow {
		return "allow"
	}
	return "deny"
}
