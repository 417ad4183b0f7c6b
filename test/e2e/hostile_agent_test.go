package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// hostileAgent stands between ferry and the real agent. While hostile it
// answers every request with the next of its broken answers; otherwise it
// passes requests through. Switching back to good ends the requests it
// was holding (as an agent restart would).
type hostileAgent struct {
	srv     *http.Server
	addr    string
	hostile atomic.Bool
	next    atomic.Uint64
	counts  sync.Map // kind -> *atomic.Int64
	perPath sync.Map // path -> *atomic.Int64
	mu      sync.Mutex
	release chan struct{}
}

// haKinds are the broken answers, in turn.
var haKinds = []string{"truncated", "wrong types", "huge", "slow", "hang", "error"}

func startHostileAgent(t *testing.T, tb *testbed.Testbed) *hostileAgent {
	t.Helper()
	up, err := url.Parse("http://" + tb.Consul.HTTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(up)
	proxy.FlushInterval = -1
	ln, err := net.Listen("tcp", net.JoinHostPort(tb.Gateway.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	h := &hostileAgent{addr: ln.Addr().String(), release: make(chan struct{})}
	chunk := []byte(strings.Repeat(`{"Node":"n","Address":"10.0.0.1","Services":[{"ID":"x","Service":"y","Port":1}]},`, 1000))
	h.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !h.hostile.Load() {
			proxy.ServeHTTP(w, r)
			return
		}
		h.mu.Lock()
		release := h.release
		h.mu.Unlock()
		// In turn per path: every endpoint ferry uses sees every kind.
		n, _ := h.perPath.LoadOrStore(r.URL.Path, new(atomic.Int64))
		kind := haKinds[int(n.(*atomic.Int64).Add(1)-1)%len(haKinds)]
		h.next.Add(1)
		c, _ := h.counts.LoadOrStore(kind, new(atomic.Int64))
		c.(*atomic.Int64).Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Consul-Index", strconv.Itoa(int(h.next.Load())+1000))
		switch kind {
		case "truncated":
			w.Write([]byte(`{"ID":"web-sidecar-proxy","Service":"web","Proxy":{"Destination`))
		case "wrong types":
			w.Write([]byte(`{"ID":7,"Service":["x"],"Port":"eighty","Proxy":"none","Roots":{"a":1},"Nodes":12,"CertPEM":false}`))
		case "huge": // 300 MiB: over the node dump's limit too
			w.Write([]byte("["))
			for sent := 0; sent < 300<<20; sent += len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		case "slow": // a byte a second, until released
			w.Write([]byte("{"))
			for {
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-release:
					return
				case <-time.After(time.Second):
					w.Write([]byte(" "))
				}
			}
		case "hang": // no answer at all, until released
			select {
			case <-r.Context().Done():
			case <-release:
			}
		case "error":
			w.WriteHeader(http.StatusInternalServerError)
			w.Write([]byte("rpc error making call: \x00\xff garbage"))
		}
	})}
	go h.srv.Serve(ln)
	t.Cleanup(func() {
		h.setHostile(false)
		h.srv.Close()
	})
	return h
}

func (h *hostileAgent) setHostile(on bool) {
	h.hostile.Store(on)
	if !on {
		h.mu.Lock()
		close(h.release)
		h.release = make(chan struct{})
		h.mu.Unlock()
	}
}

func (h *hostileAgent) summary() string {
	var parts []string
	for _, k := range haKinds {
		if c, ok := h.counts.Load(k); ok {
			parts = append(parts, fmt.Sprintf("%s %d", k, c.(*atomic.Int64).Load()))
		}
	}
	return strings.Join(parts, ", ")
}

// TestHostileAgent points ferry at an agent that answers with truncated
// JSON, wrong types, 100 MiB bodies, trickled bodies, blocking queries
// that never return and 500s with garbage, from ferry's start: ferry must
// not crash, must keep its memory bounded (proxy/consulguard caps bodies),
// must say why in its log, must stay not ready and refuse what it cannot
// authorize, and must serve once the agent answers properly.
func TestHostileAgent(t *testing.T) {
	testbed.RequireRoot(t)
	e := &dpEnv{ferryBin: testbed.FerryBinary(t)}
	e.tb = testbed.New(t)
	e.app = e.tb.AddPod(t, "app")
	e.ext = e.tb.AddPod(t, "ext")
	e.proxyID = e.tb.Register(t, testbed.Service{Name: "web", Pod: e.app, Port: dpAppPort}).ProxyID
	extLn := meshListenIn(t, e.ext, ":"+dpExtPort)
	var passed atomic.Int64
	go func() {
		for {
			c, err := extLn.Accept()
			if err != nil {
				return
			}
			passed.Add(1)
			c.Close()
		}
	}()
	e.installRedirect(t)
	e.admin = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dpDialIn(ctx, e.app, addr)
		},
	}}
	agent := startHostileAgent(t, e.tb)
	agent.setHostile(true)
	e.ferry = e.app.Start(t, testbed.Proc{UID: dpProxyUID, Name: "ferry"}, e.ferryBin, "run",
		"-proxy-id", e.proxyID, "-admin-addr", dpAdmin, "-http-addr", agent.addr, "-connect-timeout", "1s")

	// Hostile for 20 s: every kind answered several times.
	var peakKiB int64
	ext := net.JoinHostPort(e.ext.IP.String(), dpExtPort)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-e.ferry.Done():
			t.Fatalf("ferry exited under a hostile agent:\n%s", tailLines(e.ferry.Output(), 30))
		default:
		}
		peakKiB = max(peakKiB, vmRSSKiB(e.ferry.PID()))
		if code, body := e.get("/ready"); code == http.StatusOK {
			t.Fatalf("ferry ready while the agent answered nothing valid: %s", body)
		}
		// Fail closed: an outbound connection is refused, not passed on.
		if c, err := dpDialIn(context.Background(), e.app, ext); err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			c.Read(make([]byte, 1))
			c.Close()
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("hostile answers: %s; ferry peak RSS %d MiB", agent.summary(), peakKiB>>10)
	if n := passed.Load(); n > 0 {
		t.Errorf("%d outbound connections passed through while ferry had no valid view", n)
	}
	const maxRSS = 256 << 10 // KiB
	if peakKiB > maxRSS {
		t.Errorf("ferry peak RSS %d MiB under 300 MiB answers (limit %d MiB)", peakKiB>>10, maxRSS>>10)
	}
	out := e.ferry.Output()
	if !strings.Contains(out, "consul response body over the size limit") {
		t.Errorf("no log line names the oversized answer:\n%s", tailLines(out, 30))
	}

	// The agent answers properly again: ferry becomes ready and serves.
	agent.setHostile(false)
	start := time.Now()
	dpPoll(t, "ferry /ready = 200 after the agent recovered", 90*time.Second, func() bool {
		code, _ := e.get("/ready")
		return code == http.StatusOK
	}, func() string { return tailLines(e.ferry.Output(), 30) })
	t.Logf("ready %v after the agent answered properly again", time.Since(start).Round(time.Millisecond))
	c, err := dpDialIn(context.Background(), e.app, ext)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	dpPoll(t, "an outbound connection passed through after recovery", 10*time.Second, func() bool { return passed.Load() > 0 })
}

func vmRSSKiB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
