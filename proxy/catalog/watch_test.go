package catalog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// errRefused is the error chain a Source returns when the agent is down.
var errRefused = fmt.Errorf("catalog services: %w", &url.Error{Op: "Get", URL: "http://127.0.0.1:8500/v1/catalog/services",
	Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}})

// An agent restart as one watch sees it: its query fails. Another watch of
// the same view, blocked at an index the new agent has not reached (it was
// between queries when the agent went away, so it saw no error), must be
// cut short and re-read from index 0 instead of sitting out its wait.
func TestBlockingLoopResyncsAfterAnotherWatchFails(t *testing.T) {
	o := Options{WaitTime: time.Minute}
	o.setDefaults()
	rs := newResync()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })

	blockedAtOld := make(chan struct{})
	rereadFromZero := make(chan struct{})
	var once sync.Once
	wg.Add(2)
	go func() {
		defer wg.Done()
		calls := 0
		blockingLoop(ctx, &o, rs, "stale", func(ctx context.Context, idx uint64) (uint64, error) {
			calls++
			switch {
			case calls == 1:
				return 100, nil // the old agent's index
			case idx == 100:
				close(blockedAtOld)
				<-ctx.Done() // what the new agent does with index 100: block
				return 0, ctx.Err()
			case idx == 0:
				once.Do(func() { close(rereadFromZero) })
			}
			<-ctx.Done()
			return 0, ctx.Err()
		})
	}()
	go func() {
		defer wg.Done()
		<-blockedAtOld
		failed := false
		blockingLoop(ctx, &o, rs, "failing", func(ctx context.Context, idx uint64) (uint64, error) {
			if !failed {
				failed = true
				return 0, errRefused // what the HTTP client returns while the agent is down
			}
			<-ctx.Done()
			return 0, ctx.Err()
		})
	}()
	select {
	case <-rereadFromZero:
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked watch was not restarted from index 0 after another watch failed")
	}
}

// trigger ends a generation once, however many watches report its failure.
func TestResyncTriggerOncePerGeneration(t *testing.T) {
	rs := newResync()
	g0, ctx0 := rs.current()
	rs.trigger(g0)
	rs.trigger(g0) // a second watch reporting the same outage
	g1, ctx1 := rs.current()
	if g1 != g0+1 || ctx0.Err() == nil || ctx1.Err() != nil {
		t.Fatalf("after two triggers of gen %d: gen %d, old ctx %v, new ctx %v", g0, g1, ctx0.Err(), ctx1.Err())
	}
}

func TestAgentGone(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"refused", errRefused, true},
		{"reset", fmt.Errorf("x: %w", &net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}), true},
		{"EOF", &url.Error{Op: "Get", URL: "u", Err: errors.New("x")}, false},
		{"EOF wrapped", &url.Error{Op: "Get", URL: "u", Err: fmt.Errorf("read: %w", io.EOF)}, true},
		{"our call deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), true},
		{"no path to datacenter", fmt.Errorf("health connect web: %w", api.StatusError{Code: 500, Body: "No path to datacenter"}), false},
		{"forbidden", fmt.Errorf("list mesh config: %w", api.StatusError{Code: 403, Body: "Permission denied"}), false},
		{"other", errors.New("invalid character"), false},
	} {
		if got := agentGone(tt.err); got != tt.want {
			t.Errorf("%s: agentGone(%v) = %v; want %v", tt.name, tt.err, got, tt.want)
		}
	}
}

// Audit F7: a watch that keeps failing with an answer about its own query
// (an upstream in a misspelled datacenter, a 403 on one config-entry list)
// retries with backoff alone. It must not restart the other watches, and
// in particular not re-read the node dump, on every retry.
func TestFailingWatchDoesNotForceBulkRereads(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	waitReady(t, v)
	zerosBefore := f.zeros("services")

	f.setFail("health/backend@dc-typo", fmt.Errorf("health connect backend: %w",
		api.StatusError{Code: 500, Body: "No path to datacenter"}))
	f.setFail("service-defaults", fmt.Errorf("list service-defaults: %w", api.StatusError{Code: 403, Body: "Permission denied"}))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := v.Instances(ctx, Service{Name: "backend", Datacenter: "dc-typo"}); err == nil {
		t.Fatal("instances of a datacenter with no path: no error")
	}
	errsBefore := f.errors.Load()
	time.Sleep(time.Second) // a window of many retries; the count is what is tested
	retries := f.errors.Load() - errsBefore
	if retries < 10 {
		t.Fatalf("only %d failing fetches in 1s: the failing watches are not retrying", retries)
	}
	if retries > 400 {
		t.Errorf("%d failing fetches in 1s: no backoff", retries)
	}
	if n := f.proxiesCalls.Load(); n != 1 {
		t.Errorf("node dumps = %d over %d failing fetches with no catalog change; want 1 (the initial)", n, retries)
	}
	if n := f.zeros("services") - zerosBefore; n != 0 {
		t.Errorf("services index re-read from 0 %d times; want no resync", n)
	}
	// The view still serves.
	if m, ok := v.Lookup(ip("240.0.0.1")); !ok || m.Service.Name != "web" {
		t.Errorf("Lookup = %+v, %v", m, ok)
	}
}

// After an agent restart every local watch starts over, but the servers'
// catalog is the same: the services index has not moved, so the node dump
// is not read again.
func TestResyncSkipsDumpWhenIndexUnchanged(t *testing.T) {
	f := newFake()
	f.proxies = []ProxyRecord{{Service: Service{Name: "web"}, ConsulVirtual: ip("240.0.0.1")}}
	v := startView(t, f, Options{})
	waitReady(t, v)
	eventually(t, "catalog watch blocking", func() bool { return f.blocking.Load() >= 4 })
	zerosBefore := f.zeros("services")

	f.setFail("mesh", errRefused) // the agent went away, as the mesh watch sees it
	eventually(t, "resync of the catalog watch", func() bool { return f.zeros("services") > zerosBefore })
	f.setFail("mesh", nil)
	eventually(t, "watches blocking again", func() bool { return f.blocking.Load() >= 4 })
	if n := f.proxiesCalls.Load(); n != 1 {
		t.Errorf("node dumps = %d after a resync with the services index unchanged; want 1", n)
	}

	// A change is still read.
	f.setProxies(ProxyRecord{Service: Service{Name: "api"}, ConsulVirtual: ip("240.0.0.2")})
	eventually(t, "change after resync", func() bool { _, ok := v.Lookup(ip("240.0.0.2")); return ok })
}

// A watch of another datacenter's instances neither triggers a resync on
// a connection-level error nor follows one.
func TestRemoteDatacenterWatchDoesNotResync(t *testing.T) {
	f := newFake()
	v := startView(t, f, Options{})
	waitReady(t, v)
	eventually(t, "watches blocking", func() bool { return f.blocking.Load() >= 4 })
	zerosBefore := f.zeros("services")
	f.setFail("health/backend@dc2", errRefused)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	v.Instances(ctx, Service{Name: "backend", Datacenter: "dc2"})
	errs := f.errors.Load()
	eventually(t, "retries", func() bool { return f.errors.Load() > errs+3 })
	if n := f.zeros("services") - zerosBefore; n != 0 {
		t.Errorf("services index re-read from 0 %d times after a remote watch's errors; want none", n)
	}
}
