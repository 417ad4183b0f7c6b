package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
	"github.com/hashicorp/consul/api"
)

// Issue 15: the kubelet's HTTP probes, rewritten by the injector to an
// Expose.Paths listener (20300), reach an app whose own port only takes
// mTLS (transparent proxy). The "kubelet" is a plain HTTP client in a pod
// outside the mesh.
func TestExposedPathProbe(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	app := tb.AddPod(t, "app")
	kubelet := tb.AddPod(t, "kubelet")
	r := tb.Register(t, testbed.Service{Name: "app", Pod: app, Port: mtAppPort,
		Expose: api.ExposeConfig{Paths: []api.ExposePath{{ListenerPort: 20300, Path: "/healthz", LocalPathPort: mtAppPort}}}})
	meshServeHTTP(t, app, fmt.Sprintf(":%d", mtAppPort), func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "app %s %s?%s", r.Method, r.URL.Path, r.URL.RawQuery)
	})
	meshSidecar(t, app, r.ProxyID)

	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return meshDialIn(kubelet, addr, 5*time.Second)
	}}
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	get := func(u string) (int, string, error) {
		resp, err := c.Get(u)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	ip := app.IP.String()
	code, body, err := get("http://" + ip + ":20300/healthz?probe=liveness")
	if err != nil || code != 200 || body != "app GET /healthz?probe=liveness" {
		t.Fatalf("probe through 20300: %d %q %v", code, body, err)
	}
	if code, _, err := get("http://" + ip + ":20300/other"); err != nil || code != 404 {
		t.Fatalf("other path on 20300: %d %v, want 404", code, err)
	}
	if code, body, err := get("http://" + ip + ":20300/healthz"); err != nil || code != 200 || body != "app GET /healthz?" {
		t.Fatalf("probe without a query string: %d %q %v", code, body, err)
	}
	// The port is plain HTTP: a kubelet speaking TLS to it gets no page.
	tlsc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext:     tr.DialContext,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if resp, err := tlsc.Get("https://" + ip + ":20300/healthz"); err == nil {
		resp.Body.Close()
		t.Fatalf("TLS to the exposed port answered: %d", resp.StatusCode)
	}
	// The app's own port is redirected to the mTLS inbound: plain HTTP fails.
	if code, body, err := get(fmt.Sprintf("http://%s:%d/healthz", ip, mtAppPort)); err == nil {
		t.Fatalf("plain HTTP to the app's port answered: %d %q", code, body)
	} else if strings.Contains(body, "app ") {
		t.Fatal("reached the app")
	}
}

// meshServeHTTP serves h on addr inside pod's network namespace (the
// app of a test) until the test ends.
func meshServeHTTP(t *testing.T, pod *testbed.Pod, addr string, h http.HandlerFunc) {
	t.Helper()
	srv := &http.Server{Handler: h}
	go srv.Serve(meshListenIn(t, pod, addr))
	t.Cleanup(func() { srv.Close() })
}

// meshListenIn opens a TCP listener inside pod's network namespace; it
// stays there after the thread returns to the test's namespace.
func meshListenIn(t *testing.T, pod *testbed.Pod, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := pod.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}
