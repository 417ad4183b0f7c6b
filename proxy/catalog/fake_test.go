package catalog

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// fakeSource is a stateful stand-in for the Consul API calls the view makes,
// with real blocking-query semantics: a call whose WaitIndex is not behind
// the topic's index blocks until the topic changes, ctx ends, or WaitTime.
type fakeSource struct {
	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every change
	index   map[string]uint64

	dc         string
	proxies    []ProxyRecord
	ddDefaults map[string]bool
	ddGlobal   bool
	meshOnly   bool
	instances  map[string][]Instance // "name" or "name@dc"
	fail       map[string]error      // topic -> error returned until cleared
	zeroReads  map[string]int        // topic -> calls with WaitIndex 0

	proxiesCalls atomic.Int64
	errors       atomic.Int64 // errors returned by blocking calls
	blocking     atomic.Int64 // blocking calls currently waiting
	lastConnectQ atomic.Pointer[Query]
}

func newFake() *fakeSource {
	return &fakeSource{changed: make(chan struct{}), index: map[string]uint64{}, dc: "dc1",
		instances: map[string][]Instance{}, fail: map[string]error{}, zeroReads: map[string]int{}}
}

// mutate changes state under the lock and bumps the given topics' indexes.
func (f *fakeSource) mutate(fn func(), topics ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
	for _, t := range topics {
		f.index[t] = max(f.maxIndex(), 1) + 1
	}
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeSource) maxIndex() uint64 {
	var m uint64
	for _, v := range f.index {
		m = max(m, v)
	}
	return m
}

// wait blocks per blocking-query rules and returns the topic's index.
func (f *fakeSource) wait(ctx context.Context, topic string, q Query) (uint64, error) {
	var deadline <-chan time.Time
	if q.WaitTime > 0 {
		t := time.NewTimer(q.WaitTime)
		defer t.Stop()
		deadline = t.C
	}
	f.mu.Lock()
	if q.WaitIndex == 0 {
		f.zeroReads[topic]++
	}
	f.mu.Unlock()
	for {
		f.mu.Lock()
		idx, ch, err := max(f.index[topic], 1), f.changed, f.fail[topic]
		f.mu.Unlock()
		if err != nil {
			f.errors.Add(1)
			return 0, err
		}
		if q.WaitIndex < idx {
			return idx, nil
		}
		f.blocking.Add(1)
		select {
		case <-ch:
			f.blocking.Add(-1)
		case <-ctx.Done():
			f.blocking.Add(-1)
			return 0, ctx.Err()
		case <-deadline:
			f.blocking.Add(-1)
			return idx, nil
		}
	}
}

func (f *fakeSource) LocalDatacenter(ctx context.Context) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dc, f.fail["dc"]
}

func (f *fakeSource) ServicesIndex(ctx context.Context, q Query) (uint64, error) {
	return f.wait(ctx, "services", q)
}

func (f *fakeSource) Proxies(ctx context.Context) ([]ProxyRecord, uint64, error) {
	f.proxiesCalls.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["proxies"]; err != nil {
		return nil, 0, err
	}
	return append([]ProxyRecord(nil), f.proxies...), f.maxIndex(), nil
}

func (f *fakeSource) DialedDirectlyDefaults(ctx context.Context, q Query) (map[string]bool, uint64, error) {
	idx, err := f.wait(ctx, "service-defaults", q)
	if err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]bool{}
	for k, v := range f.ddDefaults {
		out[k] = v
	}
	return out, idx, nil
}

func (f *fakeSource) ProxyDefaultsDialedDirectly(ctx context.Context, q Query) (bool, uint64, error) {
	idx, err := f.wait(ctx, "proxy-defaults", q)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ddGlobal, idx, err
}

func (f *fakeSource) MeshDestinationsOnly(ctx context.Context, q Query) (bool, uint64, error) {
	idx, err := f.wait(ctx, "mesh", q)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.meshOnly, idx, err
}

func instKey(svc, dc string) string {
	if dc == "" {
		return svc
	}
	return svc + "@" + dc
}

func (f *fakeSource) Connect(ctx context.Context, svc string, q Query) ([]Instance, uint64, error) {
	f.lastConnectQ.Store(&q)
	k := instKey(svc, q.Datacenter)
	idx, err := f.wait(ctx, "health/"+k, q)
	if err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Instance(nil), f.instances[k]...), idx, nil
}

// setInstances replaces svc's passing instances ("name" or "name@dc").
func (f *fakeSource) setInstances(key string, ins ...Instance) {
	f.mutate(func() { f.instances[key] = ins }, "health/"+key)
}

func (f *fakeSource) setProxies(recs ...ProxyRecord) {
	f.mutate(func() { f.proxies = recs }, "services")
}

func (f *fakeSource) setFail(topic string, err error) {
	f.mutate(func() {
		if err == nil {
			delete(f.fail, topic)
		} else {
			f.fail[topic] = err
		}
	})
}

func inst(id, addr string) Instance {
	return Instance{ID: id, Node: "n1", Addr: mustAddrPort(addr)}
}

func mustAddrPort(s string) netip.AddrPort {
	a, err := netip.ParseAddrPort(s)
	if err != nil {
		panic(fmt.Sprintf("bad addr %q: %v", s, err))
	}
	return a
}

// zeros returns how many calls on topic asked for index 0.
func (f *fakeSource) zeros(topic string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.zeroReads[topic]
}
