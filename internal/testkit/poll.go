package testkit

import (
	"testing"
	"time"
)

// Eventually polls cond (readiness of asynchronous bookkeeping, e.g. metrics
// recorded after the client saw EOF) every 5 ms for up to 5 s, and fails
// the test naming what when it never holds.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	EventuallyWithin(t, 5*time.Second, what, cond)
}

// EventuallyWithin is Eventually with its own bound.
func EventuallyWithin(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	EventuallyShow(t, d, what, cond, nil)
}

// EventuallyShow is EventuallyWithin that prints state() (if not nil) when
// it gives up.
func EventuallyShow(t testing.TB, d time.Duration, what string, cond func() bool, state func() any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			if state != nil {
				t.Fatalf("timed out after %v waiting for %s; state: %+v", d, what, state())
			}
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
