package intentions

import (
	"context"
	"fmt"
	"testing"

	"github.com/hashicorp/consul/api"
)

// benchIntentions is a realistic destination: n exact sources, a namespace
// wildcard deny, and a global allow from "*" -> "*".
func benchIntentions(n int) []*api.Intention {
	var out []*api.Intention
	for i := range n {
		out = append(out, ixn(fmt.Sprintf("svc-%d", i), "db", allow))
	}
	out = append(out, l7("legacy", "db"), ixn("*", "db", deny), ixn("*", "*", allow))
	return out
}

// BenchmarkDecide is the per-connection cost of the local decision; compare
// with BenchmarkAgentAuthorize in test/e2e (one authorize call per connection).
func BenchmarkDecide(b *testing.B) {
	for _, n := range []int{10, 1000} {
		ev := NewEvaluator(benchIntentions(n), false)
		for _, c := range []struct {
			name string
			src  Source
		}{
			{"exact", Source{Name: fmt.Sprintf("svc-%d", n/2), Namespace: "default", Partition: "default"}},
			{"wildcard", Source{Name: "stranger"}},
			{"other-ns", Source{Name: "stranger", Namespace: "other"}},
		} {
			b.Run(fmt.Sprintf("n=%d/%s", n, c.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if ev.Decide(c.src).Reason == "" {
						b.Fatal("no reason")
					}
				}
			})
		}
	}
}

// benchWatcher is a ready watcher over 100 intentions, closed at the end.
func benchWatcher(b *testing.B) *Watcher {
	f := newFakeAgent()
	f.set(benchIntentions(100), false)
	w, err := Watch(context.Background(), Config{Fetch: f.fetch})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { w.Close() })
	<-w.Ready()
	return w
}

func BenchmarkDecideParallel(b *testing.B) {
	w := benchWatcher(b)
	src := Source{Name: "svc-7"}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if !w.Decide(src).Allow {
				b.Fatal("denied")
			}
		}
	})
}

// BenchmarkAdmit is decide + track + untrack, what an inbound connection pays
// with revocation on.
func BenchmarkAdmit(b *testing.B) {
	w := benchWatcher(b)
	src := Source{Name: "svc-7"}
	closeFn := func() {}
	b.ReportAllocs()
	for b.Loop() {
		d, done := w.Admit(src, closeFn)
		if !d.Allow {
			b.Fatal("denied")
		}
		done()
	}
}

func BenchmarkCompile(b *testing.B) {
	ixns := benchIntentions(1000)
	b.ReportAllocs()
	for b.Loop() {
		NewEvaluator(ixns, false)
	}
}
