package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// alLoad is traffic from a pod to an address while faults happen: a steady
// stream of new connections (one round trip each) and a few long-lived
// connections that exchange a message every 200 ms. Every failure counts.
type alLoad struct {
	newOK, newFailed   atomic.Int64
	longOK, longFailed atomic.Int64
	mu                 sync.Mutex
	errs               []string
	cancel             context.CancelFunc
	wg                 sync.WaitGroup
}

type alCounts struct{ NewOK, NewFailed, LongOK, LongFailed int64 }

func (c alCounts) sub(o alCounts) alCounts {
	return alCounts{c.NewOK - o.NewOK, c.NewFailed - o.NewFailed, c.LongOK - o.LongOK, c.LongFailed - o.LongFailed}
}

func (c alCounts) String() string {
	return fmt.Sprintf("new connections %d ok / %d failed; long-lived exchanges %d ok / %d failed",
		c.NewOK, c.NewFailed, c.LongOK, c.LongFailed)
}

func startLoad(t *testing.T, pod *testbed.Pod, addr string, long int) *alLoad {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &alLoad{cancel: cancel}
	var conns []net.Conn
	for i := range long {
		c, err := meshDialIn(pod, addr, 5*time.Second)
		if err == nil {
			err = alExchange(c, fmt.Sprintf("long-%d-hello", i))
		}
		if err != nil {
			t.Fatalf("long-lived connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	for i, c := range conns {
		l.wg.Go(func() {
			defer c.Close()
			for n := 0; ctx.Err() == nil; n++ {
				if err := alExchange(c, fmt.Sprintf("long-%d-%06d", i, n)); err != nil {
					l.longFailed.Add(1)
					l.note(fmt.Sprintf("long-lived %d at %s: %v", i, time.Now().Format("15:04:05.000"), err))
					return
				}
				l.longOK.Add(1)
				select {
				case <-ctx.Done():
				case <-time.After(200 * time.Millisecond):
				}
			}
		})
	}
	l.wg.Go(func() {
		for ctx.Err() == nil {
			err := func() error {
				c, err := meshDialIn(pod, addr, 5*time.Second)
				if err != nil {
					return err
				}
				defer c.Close()
				return alExchange(c, "new-conn")
			}()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				l.newFailed.Add(1)
				l.note(fmt.Sprintf("new connection at %s: %v", time.Now().Format("15:04:05.000"), err))
			} else {
				l.newOK.Add(1)
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	t.Cleanup(l.stop)
	return l
}

// alExchange writes msg and reads its echo, within 5 s.
func alExchange(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

func (l *alLoad) note(s string) {
	l.mu.Lock()
	if len(l.errs) < 20 {
		l.errs = append(l.errs, s)
	}
	l.mu.Unlock()
}

func (l *alLoad) counts() alCounts {
	return alCounts{l.newOK.Load(), l.newFailed.Load(), l.longOK.Load(), l.longFailed.Load()}
}

func (l *alLoad) stop() { l.cancel(); l.wg.Wait() }

// alCurrentServer is the server the sidecar in pod uses (its metric).
func alCurrentServer(t *testing.T, m *alMesh, pod *testbed.Pod) *testbed.Server {
	t.Helper()
	code, body := meshAdminGet(t, pod, "/metrics")
	if code != 200 {
		t.Fatalf("metrics: %d", code)
	}
	for _, l := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(l, `ferry_consul_server{server="`); ok {
			host, _, _ := net.SplitHostPort(strings.SplitN(rest, `"`, 2)[0])
			for _, s := range m.c.Servers {
				if s.Pod.IP.String() == host {
					return s
				}
			}
		}
	}
	t.Fatalf("no ferry_consul_server in metrics:\n%s", body)
	return nil
}

// TestAgentlessFaults: Consul servers fail under load (kill the server the
// frontend's sidecar uses; kill the leader; stop all three for 30 s).
// Established connections are not dropped, new connections between pods
// that already talked keep working throughout, and once the servers are
// back a new intention applies within 10 s.
func TestAgentlessFaults(t *testing.T) {
	m := alSetup(t)
	fe, _, vip := m.frontendBackend(t)
	meshPoll(t, "first connection", 15*time.Second, func() bool {
		c, err := meshDialIn(fe.Pod, vip, 5*time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		return alExchange(c, "hello") == nil
	})

	load := startLoad(t, fe.Pod, vip, 4)
	waitCluster := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := m.c.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var report []string
	var back time.Time // when the servers were started after the outage
	phase := func(name string, fault func()) {
		before := load.counts()
		start := time.Now()
		fault()
		d := load.counts().sub(before)
		line := fmt.Sprintf("%-32s %5.1fs  %s", name, time.Since(start).Seconds(), d)
		report = append(report, line)
		t.Log(line)
	}
	time.Sleep(2 * time.Second)

	phase("kill the frontend's server", func() {
		s := alCurrentServer(t, m, fe.Pod)
		s.Kill()
		time.Sleep(5 * time.Second)
		if now := alCurrentServer(t, m, fe.Pod); now == s {
			t.Errorf("frontend's sidecar still on the killed server %s", s.Name)
		}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		waitCluster()
	})
	phase("kill the leader", func() {
		l, err := m.c.Leader()
		if err != nil {
			t.Fatal(err)
		}
		l.Kill()
		time.Sleep(5 * time.Second)
		if err := l.Start(); err != nil {
			t.Fatal(err)
		}
		waitCluster()
	})
	phase("all servers down 30s", func() {
		var wg sync.WaitGroup
		for _, s := range m.c.Servers {
			wg.Go(s.Stop)
		}
		wg.Wait()
		time.Sleep(30 * time.Second)
		back = time.Now()
		for _, s := range m.c.Servers {
			if err := s.Start(); err != nil {
				t.Fatal(err)
			}
		}
		waitCluster()
	})
	load.stop()
	total := load.counts()
	t.Logf("fault summary (new connections every ~50 ms, 4 long-lived connections):\n%s\ntotal: %s",
		strings.Join(report, "\n"), total)
	if total.NewFailed > 0 || total.LongFailed > 0 {
		t.Errorf("connections failed during the faults: %s\n%s", total, strings.Join(load.errs, "\n"))
	}
	if total.NewOK == 0 || total.LongOK == 0 {
		t.Fatalf("no traffic: %s", total)
	}

	// Current again: a new intention applies within 10 s of the servers'
	// return.
	m.c.SetIntention(t, "frontend", "backend", api.IntentionActionDeny)
	d := meshPoll(t, "deny intention applied after the outage", 10*time.Second, func() bool {
		c, err := meshDialIn(fe.Pod, vip, 5*time.Second)
		if err != nil {
			return true
		}
		defer c.Close()
		return alExchange(c, "after") != nil
	})
	t.Logf("new intention applied %v after the write, %v after the servers were started again",
		d.Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
}
