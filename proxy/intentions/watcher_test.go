package intentions

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// fakeAgent is an in-memory intentions source with blocking-query
// semantics: a fetch at index i returns once the snapshot index exceeds i.
type fakeAgent struct {
	mu      sync.Mutex
	snap    Snapshot
	err     error
	changed chan struct{}
	indexes []uint64 // indexes fetches were called with
}

func newFakeAgent() *fakeAgent { return &fakeAgent{changed: make(chan struct{})} }

func (f *fakeAgent) fetch(ctx context.Context, index uint64) (Snapshot, error) {
	f.mu.Lock()
	f.indexes = append(f.indexes, index)
	f.mu.Unlock()
	for {
		f.mu.Lock()
		snap, err, ch := f.snap, f.err, f.changed
		f.mu.Unlock()
		switch {
		case err != nil:
			return Snapshot{}, err
		case snap.Index != 0 && (snap.Index > index || snap.Index < index):
			return snap, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Snapshot{}, ctx.Err()
		}
	}
}

func (f *fakeAgent) set(ixns []*api.Intention, def bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap = Snapshot{Intentions: ixns, Index: f.snap.Index + 1, DefaultAllow: def}
	f.err = nil
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) setIndex(i uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap.Index = i
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) calls() []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint64(nil), f.indexes...)
}

func startWatcher(t *testing.T, f *fakeAgent, disableRevocation bool) *Watcher {
	t.Helper()
	w, err := Watch(context.Background(), Config{
		Destination:       "db",
		Fetch:             f.fetch,
		Logger:            hclog.New(&hclog.LoggerOptions{Name: "intentions", Output: testWriter{t}, Level: hclog.Debug}),
		DisableRevocation: disableRevocation,
		MinBackoff:        5 * time.Millisecond,
		MaxBackoff:        20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// eventually polls cond; the bound is generous, the expected wait is ms.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func waitReady(t *testing.T, w *Watcher) {
	t.Helper()
	select {
	case <-w.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("watcher never became ready")
	}
}

func TestWatcherFailsClosedBeforeLoad(t *testing.T) {
	f := newFakeAgent()
	f.fail(errors.New("connection refused"))
	w := startWatcher(t, f, false)
	eventually(t, "a few failed fetches", func() bool { return w.Stats().FetchErrors >= 2 })
	if w.Loaded() {
		t.Fatal("Loaded before any list")
	}
	select {
	case <-w.Ready():
		t.Fatal("Ready closed before any list")
	default:
	}
	if got := w.Decide(Source{Name: "web"}); got != NotLoaded() {
		t.Fatalf("Decide = %+v, want %+v", got, NotLoaded())
	}
	closed := false
	d, done := w.Admit(Source{Name: "web"}, func() { closed = true })
	done()
	if d.Allow || d.Reason != ReasonNotLoaded || closed || w.Stats().Tracked != 0 {
		t.Fatalf("Admit = %+v closed=%v tracked=%d", d, closed, w.Stats().Tracked)
	}
	// First successful answer: ready, and decisions come from it.
	f.set([]*api.Intention{ixn("web", "db", allow)}, false)
	waitReady(t, w)
	if !w.Decide(Source{Name: "web"}).Allow || w.Decide(Source{Name: "api"}).Allow {
		t.Fatal("decisions after load do not follow the list")
	}
	if s := w.Stats(); !s.Loaded || s.Failing || s.Intentions != 1 || s.DefaultAllow {
		t.Fatalf("Stats = %+v", s)
	}
}

func TestWatcherKeepsServingWhenFetchFails(t *testing.T) {
	f := newFakeAgent()
	f.set([]*api.Intention{ixn("web", "db", allow), ixn("*", "db", deny)}, true)
	w := startWatcher(t, f, false)
	waitReady(t, w)

	f.fail(errors.New("dial tcp: connection refused"))
	eventually(t, "failing fetches", func() bool { return w.Stats().FetchErrors >= 3 })
	if !w.Stats().Failing {
		t.Fatal("Stats.Failing not set")
	}
	// After a failure the agent may have restarted with a lower index: the
	// retries must not block on the old one.
	if c := f.calls(); c[len(c)-1] != 0 {
		t.Fatalf("fetch index after failures = %d, want 0 (calls %v)", c[len(c)-1], c)
	}
	if !w.Decide(Source{Name: "web"}).Allow {
		t.Error("known allowed source denied during outage")
	}
	// A source never seen before is decided from the cached list.
	if d := w.Decide(Source{Name: "never-seen"}); d.Allow || d.Intention == "" {
		t.Errorf("never-seen source: %+v, want denied by the * intention", d)
	}
	// Recovery picks up the new list.
	f.set([]*api.Intention{ixn("web", "db", deny)}, true)
	eventually(t, "recovery", func() bool { return !w.Decide(Source{Name: "web"}).Allow })
	if d := w.Decide(Source{Name: "never-seen"}); !d.Allow || d.Reason != ReasonDefault {
		t.Errorf("after recovery: %+v", d)
	}
	if w.Stats().Failing {
		t.Error("Stats.Failing still set after recovery")
	}
}

func TestWatcherDefaultPolicyChange(t *testing.T) {
	f := newFakeAgent()
	f.set(nil, true)
	w := startWatcher(t, f, false)
	waitReady(t, w)
	if !w.Decide(Source{Name: "web"}).Allow {
		t.Fatal("default allow not applied")
	}
	f.set(nil, false)
	eventually(t, "default deny", func() bool { return !w.Decide(Source{Name: "web"}).Allow })
}

func TestWatcherRevokesLiveConnections(t *testing.T) {
	f := newFakeAgent()
	f.set(nil, true)
	w := startWatcher(t, f, false)
	waitReady(t, w)

	// Real loopback connections: the server side is what the inbound path
	// would hold; revocation must make the client see EOF.
	web := dialPair(t)
	api_ := dialPair(t)
	dWeb, doneWeb := w.Admit(Source{Name: "web"}, func() { web.server.Close() })
	dAPI, doneAPI := w.Admit(Source{Name: "api"}, func() { api_.server.Close() })
	t.Cleanup(doneWeb)
	t.Cleanup(doneAPI)
	if !dWeb.Allow || !dAPI.Allow || w.Stats().Tracked != 2 {
		t.Fatalf("admit: web %+v api %+v tracked %d", dWeb, dAPI, w.Stats().Tracked)
	}

	f.set([]*api.Intention{ixn("web", "db", deny)}, true)
	web.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := web.client.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("web client read after revocation: n=%d err=%v, want EOF", n, err)
	}
	// api is still allowed: its connection stays open.
	api_.client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := api_.client.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("api client read: %v, want timeout (still open)", err)
	}
	if s := w.Stats(); s.Revoked != 1 || s.Tracked != 1 {
		t.Fatalf("Stats = %+v, want Revoked 1 Tracked 1", s)
	}
	// Denied at admission: not tracked.
	if d, done := w.Admit(Source{Name: "web"}, func() { t.Error("closeFn of a denied conn called") }); d.Allow {
		t.Fatal("web admitted after deny")
	} else {
		done()
	}
}

func TestWatcherRevocationDisabled(t *testing.T) {
	f := newFakeAgent()
	f.set(nil, true)
	w := startWatcher(t, f, true)
	waitReady(t, w)
	closed := make(chan struct{})
	d, done := w.Admit(Source{Name: "web"}, func() { close(closed) })
	defer done()
	if !d.Allow {
		t.Fatal("web denied")
	}
	f.set([]*api.Intention{ixn("web", "db", deny)}, true)
	eventually(t, "deny applied", func() bool { return !w.Decide(Source{Name: "web"}).Allow })
	select {
	case <-closed:
		t.Fatal("connection closed with revocation disabled")
	case <-time.After(50 * time.Millisecond):
	}
}

func TestWatcherIndexHygiene(t *testing.T) {
	f := newFakeAgent()
	f.setIndex(10)
	w := startWatcher(t, f, false)
	waitReady(t, w)
	eventually(t, "blocking fetch at 10", func() bool { c := f.calls(); return c[len(c)-1] == 10 })
	// The agent restarted: index went back to 3. The next fetch must be a
	// non-blocking 0, then block at 3.
	f.setIndex(3)
	eventually(t, "fetch at 3", func() bool { c := f.calls(); return c[len(c)-1] == 3 })
	c := f.calls()
	if c[0] != 0 || c[len(c)-2] != 0 {
		t.Fatalf("fetch indexes %v: want first 0 and a reset to 0 before 3", c)
	}
	if w.Stats().Index != 3 {
		t.Fatalf("Stats.Index = %d", w.Stats().Index)
	}
}

func TestWatcherNoTightLoopWithoutProgress(t *testing.T) {
	calls := 0
	var mu sync.Mutex
	w, err := Watch(context.Background(), Config{
		Fetch: func(ctx context.Context, index uint64) (Snapshot, error) {
			mu.Lock()
			calls++
			mu.Unlock()
			return Snapshot{Index: 0, DefaultAllow: true}, nil // a broken endpoint
		},
		MinBackoff: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	w.Close()
	mu.Lock()
	defer mu.Unlock()
	if calls > 20 {
		t.Fatalf("%d fetches in 200ms with no index progress: tight loop", calls)
	}
}

func TestWatcherNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 5 {
		f := newFakeAgent()
		f.set(nil, true)
		w, err := Watch(context.Background(), Config{Fetch: f.fetch})
		if err != nil {
			t.Fatal(err)
		}
		<-w.Ready()
		w.Close()
		w.Close() // idempotent
	}
	ctx, cancel := context.WithCancel(context.Background())
	w, _ := Watch(ctx, Config{Fetch: newFakeAgent().fetch})
	cancel()
	w.Close()
	eventually(t, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= before })
}

func TestWatchRequiresFetch(t *testing.T) {
	if _, err := Watch(context.Background(), Config{}); err == nil {
		t.Fatal("Watch without Fetch: no error")
	}
}

type pair struct{ client, server net.Conn }

func dialPair(t *testing.T) pair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return pair{c, s}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
