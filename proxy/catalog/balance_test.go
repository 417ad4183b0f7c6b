package catalog

import (
	"container/heap"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

type expiry struct {
	at  float64
	idx int
}
type expHeap []expiry

func (h expHeap) Len() int           { return len(h) }
func (h expHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h expHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expHeap) Push(x any)        { *h = append(*h, x.(expiry)) }
func (h *expHeap) Pop() any          { o := *h; x := o[len(o)-1]; *h = o[:len(o)-1]; return x }

// simulate offers Poisson arrivals of connections with exponential
// durations to n instances, instance 0 being slow (its connections last
// slow× longer, e.g. an overloaded pod), and returns the time-averaged open
// connections on the busiest instance and on the slow one.
func simulate(n int, slow float64, choose func(active []int) int) (busiest, onSlow float64) {
	r := rand.New(rand.NewPCG(1, 2))
	active := make([]int, n)
	var h expHeap
	now, steps := 0.0, 200000
	for range steps {
		now += r.ExpFloat64() // one arrival per time unit on average
		for len(h) > 0 && h[0].at <= now {
			active[heap.Pop(&h).(expiry).idx]--
		}
		i := choose(active)
		active[i]++
		d := r.ExpFloat64() * 8 * float64(n) / 4 // ~2 open per instance at load
		if i == 0 {
			d *= slow
		}
		heap.Push(&h, expiry{now + d, i})
		m := 0
		for _, a := range active {
			m = max(m, a)
		}
		busiest += float64(m)
		onSlow += float64(active[0])
	}
	return busiest / float64(steps), onSlow / float64(steps)
}

// TestBalanceSimulation measures the chosen policy (round-robin first
// choice, random second, fewer open connections wins) against round robin,
// random and two random choices. It must keep the slow instance's load well
// below round robin's, which keeps sending it a full share.
func TestBalanceSimulation(t *testing.T) {
	const n = 4
	policies := []struct {
		name   string
		choose func() func(active []int) int
	}{
		{"round-robin", func() func([]int) int {
			rr := 0
			return func(a []int) int { rr++; return rr % len(a) }
		}},
		{"random", func() func([]int) int {
			return func(a []int) int { return rand.N(len(a)) }
		}},
		{"two-random", func() func([]int) int {
			return func(a []int) int {
				i, j := rand.N(len(a)), rand.N(len(a)-1)
				if j >= i {
					j++
				}
				if a[j] < a[i] {
					return j
				}
				return i
			}
		}},
		{"ferry (rr+random, fewer open)", func() func([]int) int {
			w := &instWatch{}
			for i := range n {
				w.insts = append(w.insts, &instState{Instance: Instance{ID: fmt.Sprint(i)}})
			}
			return func(a []int) int {
				for i, s := range w.insts {
					s.active.Store(int64(a[i]))
				}
				s := w.pick(nil, time.Now())
				for i, x := range w.insts {
					if x == s {
						return i
					}
				}
				panic("picked unknown instance")
			}
		}},
	}
	res := map[string][2]float64{}
	for _, slow := range []float64{1, 4} {
		for _, p := range policies {
			b, s := simulate(n, slow, p.choose())
			t.Logf("%d instances, slow x%.0f: %-30s busiest %.2f open, slow instance %.2f open", n, slow, p.name, b, s)
			res[fmt.Sprint(p.name, slow)] = [2]float64{b, s}
		}
	}
	rr, ours := res["round-robin4"], res["ferry (rr+random, fewer open)4"]
	if ours[1] > 0.75*rr[1] {
		t.Errorf("slow instance holds %.2f open with ferry's policy vs %.2f with round robin; want clearly fewer", ours[1], rr[1])
	}
	if ours[0] > rr[0] {
		t.Errorf("busiest instance %.2f open with ferry's policy vs %.2f with round robin", ours[0], rr[0])
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{2, 10, 100} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			w := &instWatch{}
			for i := range n {
				w.insts = append(w.insts, &instState{Instance: Instance{ID: fmt.Sprint(i)}})
			}
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				w.pick(nil, now)
			}
		})
	}
}
