package expose

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
)

// freePort returns a port nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// fakeApp answers every request with its method, path and query.
func fakeApp(t *testing.T, h2c bool) int {
	t.Helper()
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		io.WriteString(w, r.Proto+" "+r.Method+" "+r.URL.Path+"?"+r.URL.RawQuery+" "+string(body))
	}))
	if h2c {
		app.Config.Protocols = new(http.Protocols)
		app.Config.Protocols.SetUnencryptedHTTP2(true)
	}
	app.Start()
	t.Cleanup(app.Close)
	u, _ := url.Parse(app.URL)
	p, _ := strconv.Atoi(u.Port())
	return p
}

func newServer(t *testing.T) *Server {
	s := New(Config{BindIP: "127.0.0.1"})
	t.Cleanup(func() { s.Close() })
	return s
}

func get(t *testing.T, c *http.Client, method, u, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, u, strings.NewReader(body))
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestExposedPaths(t *testing.T) {
	testkit.CheckLeaks(t)
	app := fakeApp(t, false)
	s := newServer(t)
	live, ready := freePort(t), freePort(t)
	if err := s.Apply([]Path{
		{ListenerPort: live, Path: "/healthz", LocalPathPort: app},
		{ListenerPort: ready, Path: "/ready", LocalPathPort: app, Protocol: "http"},
		{ListenerPort: 0, Path: "/skipped", LocalPathPort: app},
	}); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(c.CloseIdleConnections)
	base := "http://127.0.0.1:" + strconv.Itoa(live)
	for _, tc := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"GET", "/healthz", "", 200, "HTTP/1.1 GET /healthz? "},
		{"GET", "/healthz?verbose=1&x=2", "", 200, "HTTP/1.1 GET /healthz?verbose=1&x=2 "},
		{"POST", "/healthz", "hello", 200, "HTTP/1.1 POST /healthz? hello"},
		{"GET", "/healthz/", "", 404, ""},
		{"GET", "/healthzz", "", 404, ""},
		{"GET", "/", "", 404, ""},
		{"GET", "/ready", "", 404, ""}, // another port's path
		{"GET", "/admin", "", 404, ""},
	} {
		code, body := get(t, c, tc.method, base+tc.path, tc.body)
		if code != tc.code || (tc.code == 200 && body != tc.want) {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, code, body, tc.code, tc.want)
		}
	}
	if code, _ := get(t, c, "GET", "http://127.0.0.1:"+strconv.Itoa(ready)+"/ready", ""); code != 200 {
		t.Errorf("ready port: %d", code)
	}

	// The port is plain HTTP: a TLS client fails.
	tc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if resp, err := tc.Get("https://127.0.0.1:" + strconv.Itoa(live) + "/healthz"); err == nil {
		resp.Body.Close()
		t.Fatal("TLS to the exposed port succeeded")
	}
	tc.CloseIdleConnections()
}

func TestExposedPathsFollowChanges(t *testing.T) {
	testkit.CheckLeaks(t)
	app := fakeApp(t, false)
	s := newServer(t)
	a, b := freePort(t), freePort(t)
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	code := func(port int, path string) int {
		resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(port) + path)
		if err != nil {
			return -1
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if err := s.Apply([]Path{{ListenerPort: a, Path: "/a", LocalPathPort: app}}); err != nil {
		t.Fatal(err)
	}
	if got := code(a, "/a"); got != 200 {
		t.Fatalf("a: %d", got)
	}
	if got := code(b, "/b"); got != -1 {
		t.Fatalf("b before it is listed: %d", got)
	}
	// Path changes on a, b added.
	if err := s.Apply([]Path{{ListenerPort: a, Path: "/a2", LocalPathPort: app}, {ListenerPort: b, Path: "/b", LocalPathPort: app}}); err != nil {
		t.Fatal(err)
	}
	if got := code(a, "/a"); got != 404 {
		t.Errorf("old path after change: %d", got)
	}
	if got := code(a, "/a2"); got != 200 {
		t.Errorf("new path: %d", got)
	}
	if got := code(b, "/b"); got != 200 {
		t.Errorf("added port: %d", got)
	}
	// a removed.
	if err := s.Apply([]Path{{ListenerPort: b, Path: "/b", LocalPathPort: app}}); err != nil {
		t.Fatal(err)
	}
	if got := code(a, "/a2"); got != -1 {
		t.Errorf("removed port still answers: %d", got)
	}
	s.Close()
	s.Close()
	if got := code(b, "/b"); got != -1 {
		t.Errorf("closed server still answers: %d", got)
	}
	if err := s.Apply(nil); err == nil {
		t.Error("Apply after Close succeeded")
	}
}

func TestExposedPathsHTTP2(t *testing.T) {
	testkit.CheckLeaks(t)
	app := fakeApp(t, true)
	s := newServer(t)
	p := freePort(t)
	if err := s.Apply([]Path{{ListenerPort: p, Path: "/grpc.health.v1.Health/Check", LocalPathPort: app, Protocol: "http2"}}); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	c := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	t.Cleanup(tr.CloseIdleConnections)
	code, body := get(t, c, "POST", "http://127.0.0.1:"+strconv.Itoa(p)+"/grpc.health.v1.Health/Check", "x")
	if code != 200 || body != "HTTP/2.0 POST /grpc.health.v1.Health/Check? x" {
		t.Fatalf("h2c: %d %q", code, body)
	}
}

func TestExposedPathAppDown(t *testing.T) {
	testkit.CheckLeaks(t)
	s := newServer(t)
	p := freePort(t)
	if err := s.Apply([]Path{{ListenerPort: p, Path: "/live", LocalPathPort: freePort(t)}}); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if code, _ := get(t, c, "GET", "http://127.0.0.1:"+strconv.Itoa(p)+"/live", ""); code != http.StatusBadGateway {
		t.Fatalf("app down: %d, want 502", code)
	}
}

func TestExposedPortInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	s := newServer(t)
	port := busy.Addr().(*net.TCPAddr).Port
	other := freePort(t)
	err = s.Apply([]Path{{ListenerPort: port, Path: "/x", LocalPathPort: 1}, {ListenerPort: other, Path: "/y", LocalPathPort: 1}})
	if err == nil {
		t.Fatal("no error for a port in use")
	}
	if s.Addr(other) == nil {
		t.Error("the other port was not opened")
	}
}

// TestExposeCheckListener: an Expose.Checks listener (AnyPath) forwards
// every path, but only to clients in Sources; others have their
// connection dropped unanswered.
func TestExposeCheckListener(t *testing.T) {
	app := fakeApp(t, false)
	s := newServer(t)
	n := freePort(t)
	allowed := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	if err := s.Apply([]Path{{ListenerPort: n, AnyPath: true, LocalPathPort: app, Sources: allowed}}); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 5 * time.Second}
	u := "http://127.0.0.1:" + strconv.Itoa(n)
	if code, body := get(t, c, "GET", u+"/health?x=1", ""); code != 200 || body != "HTTP/1.1 GET /health?x=1 " {
		t.Fatalf("check path: %d %q", code, body)
	}
	if code, body := get(t, c, "GET", u+"/other", ""); code != 200 || body != "HTTP/1.1 GET /other? " {
		t.Fatalf("another path: %d %q", code, body)
	}

	// The same listener for 10.0.0.0/8 only: the loopback client is dropped.
	other := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	if err := s.Apply([]Path{{ListenerPort: n, AnyPath: true, LocalPathPort: app, Sources: other}}); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(u + "/health")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("a client outside Sources got %d", resp.StatusCode)
	}
}
