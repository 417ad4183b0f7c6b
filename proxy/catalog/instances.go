package catalog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// ErrNoInstances is returned by Dial when a service has no passing instance.
var ErrNoInstances = errors.New("no passing instances")

// instWatch keeps the passing instances of one service current with a
// blocking Health().Connect query. It is started on first use and stopped by
// the reaper after Options.InstanceIdle without use.
type instWatch struct {
	svc    Service
	cancel context.CancelFunc
	done   chan struct{}
	ready  chan struct{} // closed after the first successful read
	once   sync.Once

	lastUsed atomic.Int64 // unix nanos
	active   atomic.Int64 // connections open through Dial

	mu    sync.Mutex
	insts []*instState // current passing instances
	rr    uint64       // round-robin cursor
}

// instState carries per-instance balancing state; it survives catalog
// updates as long as the instance stays listed.
type instState struct {
	Instance
	active    atomic.Int64
	failUntil time.Time // guarded by instWatch.mu
	fails     int       // consecutive failures; guarded by instWatch.mu
}

// normalize makes equal services equal keys: Datacenter "" and the local
// datacenter are the same watch.
func (v *View) normalize(svc Service) Service {
	if svc.Datacenter == v.Datacenter() {
		svc.Datacenter = ""
	}
	if svc.Namespace == "default" {
		svc.Namespace = ""
	}
	if svc.Partition == "default" {
		svc.Partition = ""
	}
	return svc
}

// watchFor returns the running watch for svc, starting one if needed, and
// waits until it has data.
func (v *View) watchFor(ctx context.Context, svc Service) (*instWatch, error) {
	// The local datacenter fills Instance.Service and tells whether an
	// explicit Datacenter is the local one (one watch for both spellings).
	select {
	case <-v.dcReady:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-v.ctx.Done():
		return nil, ErrClosed
	}
	key := v.normalize(svc)
	for {
		v.instMu.Lock()
		// Checked under instMu: Close cancels, then takes instMu before
		// waiting for goroutines, so none is started after that wait.
		if v.ctx.Err() != nil {
			v.instMu.Unlock()
			return nil, ErrClosed
		}
		w, ok := v.inst[key]
		if !ok {
			if len(v.inst) >= v.o.MaxInstanceWatches {
				v.evictLocked()
			}
			w = v.startInstWatch(key)
			v.inst[key] = w
		}
		w.lastUsed.Store(time.Now().UnixNano())
		v.instMu.Unlock()
		select {
		case <-w.ready:
			return w, nil
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for instances of %s: %w", svc.Name, ctx.Err())
		case <-w.done:
			// Evicted before its first read (cap reached); start over.
		}
	}
}

// ErrClosed is returned by Dial and Instances after Close.
var ErrClosed = errors.New("catalog view closed")

func (v *View) startInstWatch(svc Service) *instWatch {
	ctx, cancel := context.WithCancel(v.ctx)
	w := &instWatch{svc: svc, cancel: cancel, done: make(chan struct{}), ready: make(chan struct{})}
	full := svc
	if full.Datacenter == "" {
		full.Datacenter = v.Datacenter()
	}
	// Another datacenter's index is its servers', which an agent restart
	// does not change: that watch neither follows nor triggers a resync.
	rs := v.resync
	if svc.Datacenter != "" {
		rs = nil
	}
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		defer close(w.done)
		blockingLoop(ctx, &v.o, rs, "instances/"+svc.Name, func(ctx context.Context, idx uint64) (uint64, error) {
			q := v.q(idx)
			q.Datacenter = svc.Datacenter
			ins, next, err := v.src.Connect(ctx, svc.Name, q)
			if err != nil {
				return 0, err
			}
			for i := range ins {
				ins[i].Service = full
			}
			w.set(ins)
			w.once.Do(func() { close(w.ready) })
			return next, nil
		})
	}()
	return w
}

// set replaces the instance list, keeping state of instances still listed.
func (w *instWatch) set(ins []Instance) {
	w.mu.Lock()
	defer w.mu.Unlock()
	old := make(map[string]*instState, len(w.insts))
	for _, s := range w.insts {
		old[s.key()] = s
	}
	next := make([]*instState, 0, len(ins))
	for _, in := range ins {
		if s, ok := old[in.key()]; ok {
			s.Instance = in
			next = append(next, s)
			continue
		}
		next = append(next, &instState{Instance: in})
	}
	w.insts = next
}

// Instances returns the current passing instances of svc, starting a watch
// if there is none (and waiting for its first result).
func (v *View) Instances(ctx context.Context, svc Service) ([]Instance, error) {
	w, err := v.watchFor(ctx, svc)
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Instance, len(w.insts))
	for i, s := range w.insts {
		out[i] = s.Instance
	}
	return out, nil
}

// evictLocked stops the least recently used watch with no open connections,
// keeping the number of blocking queries bounded. Called with instMu held.
func (v *View) evictLocked() {
	var victim Service
	var oldest int64
	found := false
	for k, w := range v.inst {
		if w.active.Load() > 0 {
			continue
		}
		if lu := w.lastUsed.Load(); !found || lu < oldest {
			victim, oldest, found = k, lu, true
		}
	}
	if !found {
		v.log.Warn("instance watch cap reached and all watches busy; exceeding cap", "cap", v.o.MaxInstanceWatches)
		return
	}
	v.inst[victim].cancel()
	delete(v.inst, victim)
}

// reapInstances stops watches idle for longer than InstanceIdle.
func (v *View) reapInstances(ctx context.Context) {
	tick := time.NewTicker(v.o.InstanceIdle / 4)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		cutoff := time.Now().Add(-v.o.InstanceIdle).UnixNano()
		v.instMu.Lock()
		for k, w := range v.inst {
			if w.active.Load() == 0 && w.lastUsed.Load() < cutoff {
				w.cancel()
				delete(v.inst, k)
			}
		}
		v.instMu.Unlock()
	}
}
