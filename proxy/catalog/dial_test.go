package catalog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// fakeConn is a net.Conn stand-in for balancer tests that never touch bytes.
type fakeConn struct {
	net.Conn
	in     Instance
	closed bool
}

func (c *fakeConn) Close() error { c.closed = true; return nil }

// dialer records dials and fails those for instances listed in dead.
type dialer struct {
	mu    sync.Mutex
	dead  map[string]bool // instance ID -> refuse
	hang  map[string]bool // instance ID -> block until ctx ends
	count map[string]int
}

func newDialer() *dialer {
	return &dialer{dead: map[string]bool{}, hang: map[string]bool{}, count: map[string]int{}}
}

func (d *dialer) dial(ctx context.Context, in Instance) (net.Conn, error) {
	d.mu.Lock()
	d.count[in.ID]++
	dead, hang := d.dead[in.ID], d.hang[in.ID]
	d.mu.Unlock()
	if hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if dead {
		return nil, fmt.Errorf("dial %s: connection refused", in.Addr)
	}
	return &fakeConn{in: in}, nil
}

func (d *dialer) counts() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]int{}
	for k, v := range d.count {
		out[k] = v
	}
	return out
}

func twoInstances(f *fakeSource) {
	f.instances["web"] = []Instance{inst("a", "198.18.0.2:20000"), inst("b", "198.18.0.3:20000")}
}

var web = Service{Name: "web"}

func TestDialSequentialEven(t *testing.T) {
	for _, n := range []int{2, 3, 4} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			f := newFake()
			for i := range n {
				f.instances["web"] = append(f.instances["web"], inst(fmt.Sprint(i), fmt.Sprintf("198.18.0.%d:20000", i+2)))
			}
			v := startView(t, f, Options{})
			d := newDialer()
			for range 40 {
				c, _, err := v.Dial(context.Background(), web, d.dial)
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
			}
			counts := d.counts()
			for id, c := range counts {
				// Round-robin first choice with all counts equal: exactly even up to rounding.
				if c < 40/n || c > 40/n+1 {
					t.Errorf("instance %s got %d of 40 dials: %v", id, c, counts)
				}
			}
		})
	}
}

func TestDialConcurrentLeastLoaded(t *testing.T) {
	f := newFake()
	twoInstances(f)
	v := startView(t, f, Options{})
	d := newDialer()
	var held []net.Conn
	per := map[string]int{}
	for range 40 {
		c, in, err := v.Dial(context.Background(), web, d.dial)
		if err != nil {
			t.Fatal(err)
		}
		per[in.ID]++
		held = append(held, c)
	}
	if per["a"] != 20 || per["b"] != 20 {
		t.Errorf("40 held connections split %v; want 20/20", per)
	}
	// Close 10 on a: the next 10 must all go to a (fewer open).
	closed := 0
	for _, c := range held {
		if c.(*trackedConn).s.ID == "a" && closed < 10 {
			c.Close()
			c.Close() // double close must not double-count
			closed++
		}
	}
	got := map[string]int{}
	for range 10 {
		c, in, err := v.Dial(context.Background(), web, d.dial)
		if err != nil {
			t.Fatal(err)
		}
		got[in.ID]++
		defer c.Close()
	}
	if got["a"] != 10 {
		t.Errorf("after closing 10 conns on a, next 10 went %v; want all to a", got)
	}
}

func TestDialSkipsDeadInstance(t *testing.T) {
	f := newFake()
	twoInstances(f)
	v := startView(t, f, Options{FailBackoff: time.Minute})
	d := newDialer()
	d.dead["b"] = true // catalog still lists b as passing
	for i := range 30 {
		c, in, err := v.Dial(context.Background(), web, d.dial)
		if err != nil {
			t.Fatalf("dial %d failed: %v", i, err)
		}
		if in.ID != "a" {
			t.Fatalf("dial %d went to %s", i, in.ID)
		}
		c.Close()
	}
	if got := d.counts()["b"]; got != 1 {
		t.Errorf("dead instance dialed %d times in 30 conns; want 1 (then backed off)", got)
	}
}

func TestDialBackoffExpires(t *testing.T) {
	f := newFake()
	twoInstances(f)
	v := startView(t, f, Options{FailBackoff: 30 * time.Millisecond, FailBackoffMax: 30 * time.Millisecond})
	d := newDialer()
	d.dead["b"] = true
	for range 4 {
		c, _, err := v.Dial(context.Background(), web, d.dial)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	d.mu.Lock()
	d.dead["b"] = false
	d.mu.Unlock()
	time.Sleep(40 * time.Millisecond) // let the backoff lapse
	seen := false
	for range 4 {
		c, in, err := v.Dial(context.Background(), web, d.dial)
		if err != nil {
			t.Fatal(err)
		}
		seen = seen || in.ID == "b"
		c.Close()
	}
	if !seen {
		t.Error("recovered instance not used after its backoff")
	}
}

func TestDialBoundedAttempts(t *testing.T) {
	f := newFake()
	for i := range 5 {
		f.instances["web"] = append(f.instances["web"], inst(fmt.Sprint(i), fmt.Sprintf("198.18.0.%d:20000", i+2)))
	}
	v := startView(t, f, Options{MaxAttempts: 3})
	d := newDialer()
	for i := range 5 {
		d.dead[fmt.Sprint(i)] = true
	}
	_, _, err := v.Dial(context.Background(), web, d.dial)
	if err == nil {
		t.Fatal("dial succeeded with every instance dead")
	}
	total := 0
	for _, c := range d.counts() {
		total += c
	}
	if total != 3 {
		t.Errorf("dial attempts = %d, want MaxAttempts=3; err=%v", total, err)
	}
	// All backed off now: the next dial still tries (earliest backoff first)
	// rather than failing without trying.
	d.mu.Lock()
	for i := range 5 {
		d.dead[fmt.Sprint(i)] = false
	}
	d.mu.Unlock()
	if _, _, err := v.Dial(context.Background(), web, d.dial); err != nil {
		t.Errorf("dial with every instance backed off but alive: %v", err)
	}
}

func TestDialTimeoutRetries(t *testing.T) {
	f := newFake()
	twoInstances(f)
	v := startView(t, f, Options{DialTimeout: 50 * time.Millisecond})
	d := newDialer()
	d.hang["a"] = true // a black-holed instance: SYNs go nowhere
	for range 3 {
		c, in, err := v.Dial(context.Background(), web, d.dial)
		if err != nil || in.ID != "b" {
			t.Fatalf("got %v, %v; want b", in.ID, err)
		}
		c.Close()
	}
	if got := d.counts()["a"]; got != 1 {
		t.Errorf("hung instance tried %d times; want 1", got)
	}
}

func TestDialCallerCancelIsNotInstanceFailure(t *testing.T) {
	f := newFake()
	f.instances["web"] = []Instance{inst("a", "198.18.0.2:20000")}
	v := startView(t, f, Options{})
	d := newDialer()
	d.hang["a"] = true
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, _, err := v.Dial(ctx, web, d.dial); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	w, _ := v.watchFor(context.Background(), web)
	if !w.insts[0].failUntil.IsZero() {
		t.Error("instance backed off although the caller gave up")
	}
}

func TestDialNoInstances(t *testing.T) {
	f := newFake()
	v := startView(t, f, Options{})
	_, _, err := v.Dial(context.Background(), web, newDialer().dial)
	if !errors.Is(err, ErrNoInstances) {
		t.Fatalf("err = %v, want ErrNoInstances", err)
	}
	// Instances appear later: the watch picks them up.
	f.setInstances("web", inst("a", "198.18.0.2:20000"))
	eventually(t, "instances", func() bool {
		_, _, err := v.Dial(context.Background(), web, newDialer().dial)
		return err == nil
	})
}

func TestDialRemoteDatacenter(t *testing.T) {
	f := newFake()
	f.instances["web@dc2"] = []Instance{inst("r", "198.18.9.2:20000")}
	f.instances["web"] = []Instance{inst("l", "198.18.0.2:20000")}
	v := startView(t, f, Options{})
	c, in, err := v.Dial(context.Background(), Service{Name: "web", Datacenter: "dc2"}, newDialer().dial)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if in.ID != "r" || in.Service.Datacenter != "dc2" {
		t.Errorf("got %+v, want instance r in dc2", in)
	}
	// The local datacenter spelled out shares the local watch.
	_, in, err = v.Dial(context.Background(), Service{Name: "web", Datacenter: "dc1"}, newDialer().dial)
	if err != nil || in.ID != "l" || in.Service.Datacenter != "dc1" {
		t.Errorf("local: %+v, %v", in, err)
	}
	if n := v.Stats().InstanceWatches; n != 2 {
		t.Errorf("instance watches = %d, want 2 (dc2 + local)", n)
	}
}

func TestInstanceWatchReapAndCap(t *testing.T) {
	f := newFake()
	for _, s := range []string{"a", "b", "c"} {
		f.instances[s] = []Instance{inst(s, "198.18.0.2:20000")}
	}
	v := startView(t, f, Options{InstanceIdle: 40 * time.Millisecond, MaxInstanceWatches: 2})
	d := newDialer()
	ca, _, err := v.Dial(context.Background(), Service{Name: "a"}, d.dial) // held open: not evictable
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"b", "c"} {
		c, _, err := v.Dial(context.Background(), Service{Name: s}, d.dial)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if n := v.Stats().InstanceWatches; n != 2 {
		t.Errorf("watches = %d with cap 2", n)
	}
	eventually(t, "idle watches reaped", func() bool { return v.Stats().InstanceWatches == 1 })
	ca.Close()
	eventually(t, "last watch reaped after close", func() bool { return v.Stats().InstanceWatches == 0 })
}

// Real loopback sockets: the tracked conn must keep half-close working.
func TestTrackedConnHalfClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until the client's half-close
		c.Write(b)
	}()
	f := newFake()
	f.instances["web"] = []Instance{{ID: "a", Addr: mustAddrPort(ln.Addr().String())}}
	v := startView(t, f, Options{})
	c, in, err := v.Dial(context.Background(), web, func(ctx context.Context, in Instance) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", in.Addr.String())
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(interface{ NetConn() net.Conn }).NetConn().(*net.TCPConn); !ok {
		t.Error("NetConn is not the dialed *net.TCPConn")
	}
	c.Write([]byte("hello"))
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatal("tracked TCP conn lost CloseWrite")
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	w, _ := v.watchFor(context.Background(), web)
	if w.insts[0].active.Load() != 1 {
		t.Errorf("active = %d before close", w.insts[0].active.Load())
	}
	c.Close()
	if w.insts[0].active.Load() != 0 || w.active.Load() != 0 {
		t.Errorf("active not released on close")
	}
	_ = in
	var nc net.Conn = &fakeConn{}
	if _, ok := track(nc, w, w.insts[0]).(interface{ CloseWrite() error }); ok {
		t.Error("CloseWrite advertised for a conn without it")
	}
}

func TestCloseDuringDials(t *testing.T) {
	f := newFake()
	for i := range 20 {
		f.instances[fmt.Sprint("s", i)] = []Instance{inst("a", "198.18.0.2:20000")}
	}
	v := startView(t, f, Options{MaxInstanceWatches: 5})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				c, _, err := v.Dial(context.Background(), Service{Name: fmt.Sprint("s", (g+i)%20)}, newDialer().dial)
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						t.Errorf("dial: %v", err)
					}
					return
				}
				c.Close()
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	v.Close()
	wg.Wait()
}
