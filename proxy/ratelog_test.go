package proxy

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/hashicorp/go-hclog"
)

func TestRateLog(t *testing.T) {
	t0 := time.Unix(1000, 0)
	type ev struct {
		at         time.Duration // since t0
		key        string
		ok         bool
		suppressed int
	}
	for _, tc := range []struct {
		name string
		evs  []ev
	}{
		{"first is logged", []ev{{0, "a", true, 0}}},
		{"repeats within the interval are counted", []ev{
			{0, "a", true, 0}, {time.Second, "a", false, 0}, {2 * time.Second, "a", false, 0},
			{10 * time.Second, "a", true, 2}, {11 * time.Second, "a", false, 0}, {25 * time.Second, "a", true, 1},
		}},
		{"keys are independent", []ev{
			{0, "a", true, 0}, {0, "b", true, 0}, {time.Second, "a", false, 0}, {time.Second, "b", false, 0},
			{10 * time.Second, "b", true, 1},
		}},
		{"quiet key logs at once", []ev{{0, "a", true, 0}, {time.Hour, "a", true, 0}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var now time.Time
			r := newRateLog(10*time.Second, func() time.Time { return now })
			for i, e := range tc.evs {
				now = t0.Add(e.at)
				ok, n := r.allow(e.key)
				if ok != e.ok || n != e.suppressed {
					t.Fatalf("event %d (%v %s): allow = %v, %d; want %v, %d", i, e.at, e.key, ok, n, e.ok, e.suppressed)
				}
			}
		})
	}
}

// A flood of distinct keys never grows the table past logMaxKeys.
func TestRateLogBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	r := newRateLog(10*time.Second, func() time.Time { return now })
	for i := range 5 * logMaxKeys {
		if ok, _ := r.allow(fmt.Sprint(i)); !ok {
			t.Fatalf("new key %d not logged", i)
		}
		if len(r.keys) > logMaxKeys {
			t.Fatalf("%d keys tracked, limit %d", len(r.keys), logMaxKeys)
		}
	}
}

// Every refused connection is counted, but a burst of the same failure is
// one WARN line, not one per connection.
func TestDialFailuresLoggedOncePerInterval(t *testing.T) {
	testkit.CheckLeaks(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	var logs testkit.LogBuffer
	p := startProxy(t, Config{ConnectTimeout: time.Second, Logger: hclog.New(&hclog.LoggerOptions{Output: &logs})}, dead)
	in, _ := p.Addrs()
	const n = 20
	for range n {
		if _, err := exchange(t, in.String(), "x"); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("app down: %v, want reset", err)
		}
	}
	testkit.Eventually(t, "dial errors counted", func() bool { return counter(p, "inbound", "dial_error") == n })
	if got := strings.Count(logs.String(), "dial failed"); got != 1 {
		t.Fatalf("%d connections refused, %d \"dial failed\" lines; want 1:\n%s", n, got, logs.String())
	}
}
