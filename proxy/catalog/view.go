package catalog

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Options tune a View. Zero values take the defaults noted.
type Options struct {
	Logger hclog.Logger
	// Datacenter is the local datacenter; "" = ask the agent once at start.
	Datacenter string
	// WaitTime is the blocking-query wait (default 5m, Consul's default).
	WaitTime time.Duration
	// MinInterval spaces consecutive calls of one watch (default 50ms).
	MinInterval time.Duration
	// RetryMin/RetryMax bound the error backoff of a watch (250ms, 10s).
	RetryMin, RetryMax time.Duration

	// DialTimeout bounds one dial attempt in Dial (default 2s).
	DialTimeout time.Duration
	// MaxAttempts bounds the instances one Dial tries (default 3).
	MaxAttempts int
	// FailBackoff is how long an instance that failed a dial is avoided;
	// it doubles per consecutive failure up to FailBackoffMax (5s, 60s).
	FailBackoff, FailBackoffMax time.Duration
	// InstanceIdle stops a service's instance watch unused for this long
	// (default 2m). MaxInstanceWatches caps concurrent instance watches
	// (default 64; the agent allows 200 connections per client by default).
	InstanceIdle       time.Duration
	MaxInstanceWatches int

	// VirtualCIDRs, when set, are the only ranges in which a `virtual`
	// tagged address is honoured (the cluster's service range): the tag is
	// free text from whoever registers an instance.
	VirtualCIDRs []netip.Prefix
}

func (o *Options) setDefaults() {
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	def := func(p *time.Duration, d time.Duration) {
		if *p <= 0 {
			*p = d
		}
	}
	def(&o.WaitTime, 5*time.Minute)
	def(&o.MinInterval, 50*time.Millisecond)
	def(&o.RetryMin, 250*time.Millisecond)
	def(&o.RetryMax, 10*time.Second)
	def(&o.DialTimeout, 2*time.Second)
	def(&o.FailBackoff, 5*time.Second)
	def(&o.FailBackoffMax, 60*time.Second)
	def(&o.InstanceIdle, 2*time.Minute)
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 3
	}
	if o.MaxInstanceWatches <= 0 {
		o.MaxInstanceWatches = 64
	}
}

// mapWatches is the fixed number of blocking queries behind the IP map.
const mapWatches = 4

// View is the live mesh view. Its methods are safe for concurrent use.
type View struct {
	src    Source
	o      Options
	resync *resync // restarts every local watch when the agent went away
	log    hclog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	table    atomic.Pointer[table]
	meshOnly atomic.Bool
	dc       atomic.Pointer[string]
	dcReady  chan struct{}
	ready    chan struct{}

	mu         sync.Mutex // guards the inputs below and readiness bookkeeping
	proxies    []ProxyRecord
	ddDefaults map[string]bool
	ddGlobal   bool
	loaded     [mapWatches]bool
	readyDone  bool

	instMu sync.Mutex
	inst   map[Service]*instWatch

	dumpFetches atomic.Uint64
	lastDump    atomic.Int64 // duration of the last bulk read, ns
}

const (
	srcProxies = iota
	srcServiceDefaults
	srcProxyDefaults
	srcMesh
)

// Start begins watching. The view stays current until ctx ends or Close is
// called; wait on Ready before trusting Lookup.
func Start(ctx context.Context, src Source, o Options) *View {
	o.setDefaults()
	v := &View{src: src, o: o, log: o.Logger.Named("catalog"), dcReady: make(chan struct{}),
		ready: make(chan struct{}), inst: make(map[Service]*instWatch), resync: newResync()}
	v.o.Logger = v.log
	v.ctx, v.cancel = context.WithCancel(ctx)
	v.table.Store(&table{})
	if o.Datacenter != "" {
		v.setDC(o.Datacenter)
	}
	v.goWatch(v.watchProxies)
	v.goWatch(func(ctx context.Context) {
		blockingLoop(ctx, &v.o, v.resync, "service-defaults", func(ctx context.Context, idx uint64) (uint64, error) {
			dd, next, err := v.src.DialedDirectlyDefaults(ctx, v.q(idx))
			if err == nil {
				v.update(srcServiceDefaults, func() { v.ddDefaults = dd })
			}
			return next, err
		})
	})
	v.goWatch(func(ctx context.Context) {
		blockingLoop(ctx, &v.o, v.resync, "proxy-defaults", func(ctx context.Context, idx uint64) (uint64, error) {
			g, next, err := v.src.ProxyDefaultsDialedDirectly(ctx, v.q(idx))
			if err == nil {
				v.update(srcProxyDefaults, func() { v.ddGlobal = g })
			}
			return next, err
		})
	})
	v.goWatch(func(ctx context.Context) {
		blockingLoop(ctx, &v.o, v.resync, "mesh", func(ctx context.Context, idx uint64) (uint64, error) {
			only, next, err := v.src.MeshDestinationsOnly(ctx, v.q(idx))
			if err == nil {
				if v.meshOnly.Swap(only) != only {
					v.log.Info("mesh config changed", "mesh_destinations_only", only)
				}
				v.update(srcMesh, nil)
			}
			return next, err
		})
	})
	v.goWatch(v.reapInstances)
	return v
}

func (v *View) goWatch(f func(ctx context.Context)) {
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		f(v.ctx)
	}()
}

func (v *View) q(idx uint64) Query { return Query{WaitIndex: idx, WaitTime: v.o.WaitTime} }

// Close stops every watch and waits for them. It is idempotent.
func (v *View) Close() error {
	v.cancel()
	v.instMu.Lock() // see watchFor: no instance watch starts after this
	v.instMu.Unlock()
	v.wg.Wait()
	return nil
}

// Ready is closed once every map watch has loaded once.
func (v *View) Ready() <-chan struct{} { return v.ready }

// Datacenter returns the local datacenter ("" until known).
func (v *View) Datacenter() string {
	if p := v.dc.Load(); p != nil {
		return *p
	}
	return ""
}

func (v *View) setDC(dc string) {
	if v.dc.CompareAndSwap(nil, &dc) {
		close(v.dcReady)
	}
}

// Lookup maps an original destination IP (any port) to its mesh service.
// A Match with Ambiguous set means several services claim the IP: the
// caller must refuse the connection (fail closed), not pick one.
func (v *View) Lookup(ip netip.Addr) (Match, bool) {
	m, ok := v.table.Load().byIP[ip.Unmap()]
	return m, ok
}

// VirtualIP returns the address a client should dial for service name (in
// the default namespace and partition): the `virtual` tagged address when
// one is registered, else the Consul-assigned `consul-virtual` VIP. Names
// match case-insensitively, as Consul's catalog does.
func (v *View) VirtualIP(name string) (netip.Addr, bool) {
	t := v.table.Load()
	name = strings.ToLower(name)
	if a, ok := t.virtual[name]; ok {
		return a, true
	}
	a, ok := t.consul[name]
	return a, ok
}

// MeshDestinationsOnly reports whether connections to non-mesh destinations
// must be refused (mesh config entry TransparentProxy.MeshDestinationsOnly).
func (v *View) MeshDestinationsOnly() bool { return v.meshOnly.Load() }

// Stats is a snapshot of the view's size and cost, for metrics and tests.
type Stats struct {
	Services        int // distinct services with a VIP or direct address
	Records         int // connect instances in the last bulk read
	IPs             int // entries in the IP map
	DirectIPs       int // of which DialedDirectly instance addresses
	MapWatches      int // blocking queries behind the map (constant)
	InstanceWatches int // live per-service instance watches
	Conflicts       int // addresses claimed by more than one service (refused)
	IgnoredClaims   int // `virtual`/instance-address claims dropped (range, another's VIP)
	BulkReads       uint64
	LastBulkRead    time.Duration
}

func (v *View) Stats() Stats {
	t := v.table.Load()
	names := make(map[string]struct{}, len(t.consul))
	for n := range t.consul {
		names[n] = struct{}{}
	}
	for n := range t.virtual {
		names[n] = struct{}{}
	}
	for _, m := range t.byIP {
		if m.Ambiguous {
			continue
		}
		names[strings.ToLower(m.Service.Name)] = struct{}{}
	}
	v.instMu.Lock()
	iw := len(v.inst)
	v.instMu.Unlock()
	return Stats{Services: len(names), Records: t.records, IPs: len(t.byIP), DirectIPs: t.direct,
		MapWatches: mapWatches, InstanceWatches: iw,
		Conflicts: len(t.conflicts), IgnoredClaims: len(t.ignored), BulkReads: v.dumpFetches.Load(),
		LastBulkRead: time.Duration(v.lastDump.Load())}
}

// watchProxies blocks on the catalog services index and re-reads the bulk
// listing when it moves. Check-status changes do not move that index, so
// health flaps cost nothing here.
func (v *View) watchProxies(ctx context.Context) {
	for v.Datacenter() == "" {
		dc, err := v.src.LocalDatacenter(ctx)
		if err == nil {
			v.setDC(dc)
			break
		}
		v.log.Warn("cannot read local datacenter; retrying", "error", err)
		sleep(ctx, v.o.RetryMax/4)
		if ctx.Err() != nil {
			return
		}
	}
	var have uint64 // services index the current listing reflects
	loaded := false
	blockingLoop(ctx, &v.o, v.resync, "catalog", func(ctx context.Context, idx uint64) (uint64, error) {
		next, err := v.src.ServicesIndex(ctx, v.q(idx))
		if err != nil {
			return 0, err
		}
		// Re-read only when the index moved, either way (backwards: a
		// restore). A resync after an agent restart lands here with idx
		// 0, but the servers' catalog is the same: skip the dump.
		if loaded && next == have {
			return next, nil
		}
		start := time.Now()
		recs, _, err := v.src.Proxies(ctx)
		if err != nil {
			return 0, err
		}
		d := time.Since(start)
		v.dumpFetches.Add(1)
		v.lastDump.Store(int64(d))
		have, loaded = next, true
		v.update(srcProxies, func() { v.proxies = recs })
		// Coalesce bursts: spend at most about half the time reading.
		sleep(ctx, d)
		return next, nil
	})
}

// update applies a change to the inputs and rebuilds the table once the
// inputs it depends on have all loaded.
func (v *View) update(which int, apply func()) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if apply != nil {
		apply()
	}
	v.loaded[which] = true
	if which != srcMesh && v.loaded[srcProxies] && v.loaded[srcServiceDefaults] && v.loaded[srcProxyDefaults] {
		t := buildTable(v.proxies, v.ddDefaults, v.ddGlobal, v.Datacenter(), v.o.VirtualCIDRs)
		v.logChanges(v.table.Swap(t), t)
	}
	if !v.readyDone && v.loaded == [mapWatches]bool{true, true, true, true} {
		v.readyDone = true
		t := v.table.Load()
		v.log.Info("catalog view ready", "ips", len(t.byIP), "instances", t.records)
		close(v.ready)
	}
}

// logChanges logs the conflicts and ignored claims that appeared or went
// away between two tables: once per change, not per connection.
func (v *View) logChanges(old, cur *table) {
	for a, who := range cur.conflicts {
		if old.conflicts[a] != who {
			v.log.Error("address claimed by more than one service; refusing connections to it until the catalog agrees",
				"address", a, "services", who)
		}
	}
	for a, who := range old.conflicts {
		if _, ok := cur.conflicts[a]; !ok {
			v.log.Info("address conflict resolved", "address", a, "services_were", who)
		}
	}
	for k, ic := range cur.ignored {
		if _, ok := old.ignored[k]; !ok {
			v.log.Warn("ignoring address claim", "address", ic.Addr, "service", ic.Service, "reason", ic.Reason)
		}
	}
}
