package catalog

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

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
				return 0, errors.New("connection refused")
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
