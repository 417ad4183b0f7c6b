package testkit

import (
	"testing"
	"time"
)

// Run is a function running in the background of a test (a pump, a
// server loop) whose result the test waits for.
type Run[T any] struct {
	done chan struct{}
	val  T
}

// Go runs f in the background. When the test ends, stop (if not nil) is
// called to make f return, and the test fails unless f returns within 5 s.
func Go[T any](t testing.TB, f func() T, stop func()) *Run[T] {
	t.Helper()
	r := &Run[T]{done: make(chan struct{})}
	go func() {
		r.val = f()
		close(r.done)
	}()
	t.Cleanup(func() {
		if stop != nil {
			stop()
		}
		select {
		case <-r.done:
		case <-time.After(5 * time.Second):
			t.Error("background run did not finish after its stop")
		}
	})
	return r
}

// Wait returns f's result once it has returned, failing the test after d.
func (r *Run[T]) Wait(t testing.TB, d time.Duration) T {
	t.Helper()
	select {
	case <-r.done:
		return r.val
	case <-time.After(d):
		t.Fatal("background run did not finish")
	}
	var zero T
	return zero
}

// Done is closed when f has returned.
func (r *Run[T]) Done() <-chan struct{} { return r.done }
