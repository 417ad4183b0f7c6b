package proxy

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// The goroutine and fd gauges follow the process: one more open file is
// one more fd, one more parked goroutine one more goroutine.
func TestProcessMetrics(t *testing.T) {
	m := NewMetrics()
	scrape := func() (goroutines, fds int) {
		var b strings.Builder
		m.Set.WritePrometheus(&b)
		goroutines, fds = -1, -1
		for _, l := range strings.Split(b.String(), "\n") {
			if v, ok := strings.CutPrefix(l, "ferry_goroutines "); ok {
				goroutines, _ = strconv.Atoi(v)
			}
			if v, ok := strings.CutPrefix(l, "ferry_open_fds "); ok {
				fds, _ = strconv.Atoi(v)
			}
		}
		if goroutines < 1 || fds < 3 {
			t.Fatalf("goroutines %d, fds %d in:\n%s", goroutines, fds, b.String())
		}
		return goroutines, fds
	}
	g0, f0 := scrape()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	stop, parked := make(chan struct{}), make(chan struct{})
	go func() { close(parked); <-stop }()
	<-parked
	g1, f1 := scrape()
	close(stop)
	f.Close()
	if f1 != f0+1 {
		t.Errorf("open fds %d -> %d with one more file open", f0, f1)
	}
	if g1 < g0+1 {
		t.Errorf("goroutines %d -> %d with one more parked", g0, g1)
	}
}
