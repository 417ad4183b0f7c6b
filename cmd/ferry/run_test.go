package main

import (
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/ktls"
	"github.com/ferrymesh/ferry/mtls/mtlstest"
	"github.com/ferrymesh/ferry/proxy"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

func TestParseRunFlags(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		code    int // 0: no error
		wantErr string
		check   func(runConfig) bool
	}{
		{"proxy id with defaults", []string{"-proxy-id", "web-sidecar-proxy"}, 0, "", func(c runConfig) bool {
			return c.ProxyID == "web-sidecar-proxy" && c.AdminAddr == "127.0.0.1:19000" &&
				c.ConnectTimeout == proxy.DefaultConnectTimeout && c.IdleTimeout == proxy.DefaultIdleTimeout &&
				c.DrainTimeout == 15*time.Second && c.MaxConnections == 10000 && c.ProxyUID == 5995
		}},
		{"sidecar-for and overrides", []string{"-sidecar-for", "web", "-inbound-addr", "0.0.0.0:21000", "-outbound-addr", "127.0.0.1:15101",
			"-local-app", "127.0.0.1:9090", "-max-connections", "100", "-idle-timeout", "0", "-http-addr", "198.18.0.1:8500", "-token", "t"}, 0, "",
			func(c runConfig) bool {
				return c.SidecarFor == "web" && c.Inbound == "0.0.0.0:21000" && c.Outbound == "127.0.0.1:15101" && c.LocalApp == "127.0.0.1:9090" &&
					c.MaxConnections == 100 && c.IdleTimeout == 0 && c.HTTPAddr == "198.18.0.1:8500" && c.Token == "t"
			}},
		{"mesh defaults", []string{"-proxy-id", "a"}, 0, "", func(c runConfig) bool {
			return !c.Permissive && c.LiveRevocation && c.HandshakeTimeout == proxy.DefaultHandshakeTimeout &&
				c.DNSAddr == "127.0.0.1:8600" && c.ClusterDomain == "cluster.local" && len(c.DNSRecursors) == 0
		}},
		{"mesh flags", []string{"-proxy-id", "a", "-permissive", "-live-revocation=false", "-dns-addr", "", "-dns-recursor", "198.18.0.53",
			"-dns-recursor", "198.18.0.54:5353", "-cluster-domain", "example.internal"}, 0, "", func(c runConfig) bool {
			return c.Permissive && !c.LiveRevocation && c.DNSAddr == "" && c.ClusterDomain == "example.internal" &&
				strings.Join(c.DNSRecursors, ",") == "198.18.0.53,198.18.0.54:5353"
		}},
		{"virtual cidrs", []string{"-proxy-id", "a", "-virtual-cidr", "10.96.0.0/12", "-virtual-cidr", "fd00:10:96::1/112"}, 0, "",
			func(c runConfig) bool { return c.VirtualCIDRs.String() == "10.96.0.0/12,fd00:10:96::/112" }},
		{"bad virtual cidr", []string{"-proxy-id", "a", "-virtual-cidr", "10.96.0.1"}, 2, "not a CIDR", nil},
		{"zero handshake timeout", []string{"-proxy-id", "a", "-handshake-timeout", "0s"}, 2, "handshake-timeout", nil},
		{"no id", nil, 2, "one of -proxy-id or -sidecar-for", nil},
		{"both ids", []string{"-proxy-id", "a", "-sidecar-for", "b"}, 2, "mutually exclusive", nil},
		{"negative cap", []string{"-proxy-id", "a", "-max-connections", "-1"}, 2, "max-connections", nil},
		{"negative proxy uid", []string{"-proxy-id", "a", "-proxy-uid", "-1"}, 2, "proxy-uid", nil},
		{"zero connect timeout", []string{"-proxy-id", "a", "-connect-timeout", "0s"}, 2, "connect-timeout", nil},
		{"bad level", []string{"-proxy-id", "a", "-log-level", "loud"}, 2, "log-level", nil},
		{"stray arg", []string{"-proxy-id", "a", "extra"}, 2, "unexpected arguments", nil},
		{"default intention policy", []string{"-proxy-id", "a", "-default-intention-policy", "deny"}, 0, "", func(c runConfig) bool {
			return c.DefaultPolicy == "deny"
		}},
		{"default intention policy from consul", []string{"-proxy-id", "a"}, 0, "", func(c runConfig) bool { return c.DefaultPolicy == "" }},
		{"bad default intention policy", []string{"-proxy-id", "a", "-default-intention-policy", "open"}, 2, "default-intention-policy", nil},
		{"unknown flag", []string{"-nope"}, 2, "not defined", nil},
		{"ktls default auto", []string{"-proxy-id", "a"}, 0, "", func(c runConfig) bool { return c.KTLS == ktls.Auto }},
		{"ktls off", []string{"-proxy-id", "a", "-ktls=off"}, 0, "", func(c runConfig) bool { return c.KTLS == ktls.Off }},
		{"ktls required without tunnels", []string{"-proxy-id", "a", "-ktls=required", "-tunnels=false"}, 0, "", func(c runConfig) bool {
			return c.KTLS == ktls.Required && !c.Tunnels
		}},
		// Tunnel sessions go into the kernel too (ferry/tunnel+ktls).
		{"ktls required with tunnels", []string{"-proxy-id", "a", "-ktls=required"}, 0, "", func(c runConfig) bool {
			return c.KTLS == ktls.Required && c.Tunnels
		}},
		{"bad ktls", []string{"-proxy-id", "a", "-ktls=maybe"}, 2, "want auto, off or required", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CONNECT_PROXY_ID", "")
			t.Setenv("CONNECT_SIDECAR_FOR", "")
			c, err := parseRunFlags(tc.args, io.Discard)
			if tc.code == 0 {
				if err != nil || !tc.check(c) {
					t.Fatalf("parse %v: %+v, %v", tc.args, c, err)
				}
				return
			}
			var ee *exitError
			if !errors.As(err, &ee) || ee.code != tc.code || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("parse %v: err %v, want exit %d with %q", tc.args, err, tc.code, tc.wantErr)
			}
		})
	}
}

// fakeAgent serves /v1/agent/service/<id> with hash-based blocking, like the
// real agent, and lets the test change the registration. It also answers
// the mesh endpoints the sidecar watches (leaf, roots, intentions, catalog,
// config entries) with fixed content: index 1, and a short block when asked
// to wait past it.
type fakeAgent struct {
	mu      sync.Mutex
	svc     *api.AgentService
	hash    int
	changed chan struct{}
	static  map[string]any // path -> JSON body; a nil body is a 404
	// gates hold the first answer of a path until the channel is closed.
	gates map[string]chan struct{}
}

func (f *fakeAgent) set(svc *api.AgentService) {
	f.mu.Lock()
	f.svc = svc
	f.hash++
	if f.changed != nil {
		close(f.changed)
	}
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *fakeAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if body, ok := f.static[r.URL.Path]; ok {
		if g, ok := f.gates[r.URL.Path]; ok {
			select {
			case <-g:
			case <-r.Context().Done():
				return
			}
		}
		if r.URL.Query().Get("index") == "1" {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(2 * time.Second):
			}
		}
		w.Header().Set("X-Consul-Index", "1")
		if body == nil {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(body)
		return
	}
	if !strings.HasPrefix(r.URL.Path, "/v1/agent/service/") {
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	svc, hash, ch := f.svc, strconv.Itoa(f.hash), f.changed
	f.mu.Unlock()
	if r.URL.Query().Get("hash") == hash {
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-time.After(2 * time.Second): // a short "wait" so tests end quickly
		}
		f.mu.Lock()
		svc, hash = f.svc, strconv.Itoa(f.hash)
		f.mu.Unlock()
	}
	w.Header().Set("X-Consul-ContentHash", hash)
	json.NewEncoder(w).Encode(svc)
}

// freeAddr returns a loopback address that is free now, below the
// ephemeral range: a port handed out by the kernel (":0") and closed again
// is soon reused as the source port of some other test's connection on
// this busy machine, and the proxy's bind then fails.
func freeAddr(t *testing.T) string {
	t.Helper()
	for range 100 {
		addr := "127.0.0.1:" + strconv.Itoa(21000+rand.IntN(11000))
		l, err := net.Listen("tcp", addr)
		if err == nil {
			l.Close()
			return addr
		}
	}
	t.Fatal("no free port in 21000-32000")
	return ""
}

func port(t *testing.T, addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}

// TestRunLifecycle drives runProxy against a fake agent: ready only once
// the registration is loaded, follows a registration change, drains on the
// first signal (/ready 503, established connection still served), exits at
// once on the second, and leaves no goroutines behind.
func TestRunLifecycle(t *testing.T) {
	before := runtime.NumGoroutine()
	app1, app2 := testkit.PrefixServer(t, "one:"), testkit.PrefixServer(t, "two:")
	in, out, admin := freeAddr(t), freeAddr(t), freeAddr(t)
	reg := func(app string) *api.AgentService {
		return &api.AgentService{
			Kind: api.ServiceKindConnectProxy, ID: "web-sidecar-proxy", Port: port(t, in),
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: "web", LocalServicePort: port(t, app),
				TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: port(t, out)},
				Config:           map[string]any{"bind_address": "127.0.0.1"},
			},
		}
	}
	ca := mtlstest.NewCA(t)
	leaf, key := ca.Leaf(t, ca.ID("web"), mtlstest.EC256)
	fa := &fakeAgent{static: map[string]any{
		"/v1/agent/connect/ca/leaf/web": map[string]any{"SerialNumber": "01", "CertPEM": string(leaf), "PrivateKeyPEM": string(key),
			"Service": "web", "ServiceURI": ca.ID("web").String(), "ValidAfter": time.Now().Add(-time.Minute), "ValidBefore": time.Now().Add(time.Hour)},
		"/v1/agent/connect/ca/roots": map[string]any{"ActiveRootID": "r1", "TrustDomain": ca.TrustDomain,
			"Roots": []map[string]any{{"ID": "r1", "Name": "test", "RootCert": string(ca.RootPEM), "Active": true}}},
		"/v1/connect/intentions/match": map[string]any{"web": []any{}},
		"/v1/agent/self":               map[string]any{"Config": map[string]any{"Datacenter": "dc1", "NodeName": "n1"}},
		"/v1/catalog/services":         map[string]any{"consul": []string{}},
		"/v1/internal/ui/nodes":        []any{},
		"/v1/config/service-defaults":  []any{},
		"/v1/config/proxy-defaults":    []any{},
		"/v1/config/mesh":              []any{},
	}}
	// The leaf is held back at first: /ready must say why it is not ready.
	leafGate := make(chan struct{})
	fa.gates = map[string]chan struct{}{"/v1/agent/connect/ca/leaf/web": leafGate}
	fa.set(reg(app1))
	agentSrv := httptest.NewServer(fa)
	defer agentSrv.Close()

	// Permissive: the test talks plain TCP to the inbound listener; the
	// mTLS path is proven end to end in test/e2e.
	cfg := runConfig{ProxyID: "web-sidecar-proxy", HTTPAddr: agentSrv.URL, AdminAddr: admin,
		ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: time.Minute,
		Permissive: true, HandshakeTimeout: time.Second, LiveRevocation: true}
	sigs := make(chan os.Signal, 2)
	done := make(chan error, 1)
	logw := &testkit.LogBuffer{}
	defer func() {
		if t.Failed() {
			t.Logf("ferry log:\n%s", logw.String())
		}
	}()
	go func() {
		done <- runProxy(cfg, hclog.New(&hclog.LoggerOptions{Output: logw, Level: hclog.Debug}), sigs)
	}()

	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	ready := func() (int, string) {
		resp, err := hc.Get("http://" + admin + "/ready")
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	poll := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	poll("503 until the leaf certificate arrives", func() bool {
		c, b := ready()
		return c == 503 && strings.Contains(b, "identity")
	})
	close(leafGate)
	poll("ready", func() bool {
		select {
		case err := <-done:
			t.Fatalf("runProxy returned before it was ready: %v", err)
		default:
		}
		c, _ := ready()
		return c == 200
	})

	talk := func(msg string) string {
		c, err := net.Dial("tcp", in)
		if err != nil {
			return err.Error()
		}
		defer c.Close()
		c.Write([]byte(msg))
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		return string(b)
	}
	if got := talk("hi"); got != "one:hi" {
		t.Fatalf("through ferry: %q", got)
	}
	fa.set(reg(app2))
	poll("registration change applied", func() bool { return talk("x") == "two:x" })

	held, err := net.Dial("tcp", in)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	held.Write([]byte("a"))
	held.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadFull(held, make([]byte, 5)) // "two:a": now being pumped

	sigs <- syscall.SIGTERM
	poll("draining", func() bool { c, b := ready(); return c == 503 && strings.Contains(b, "draining") })
	held.Write([]byte("b"))
	if _, err := io.ReadFull(held, make([]byte, 1)); err != nil {
		t.Fatalf("established connection during drain: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("runProxy returned during drain: %v", err)
	default:
	}

	start := time.Now()
	sigs <- syscall.SIGINT
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runProxy: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("second signal did not stop ferry")
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("second signal took %v", el)
	}
	if _, err := io.ReadAll(held); err != nil && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("held connection after exit: %v", err)
	}
	agentSrv.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 { // +2: the echo apps' accept loops, stopped at cleanup
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// At start, -ktls=required on a kernel without kernel TLS is a clear error
// before anything else starts (no Consul, no listener), and auto says in
// one log line why it is not used.
func TestKTLSDecidedAtStart(t *testing.T) {
	if ktls.Supported() {
		t.Skip("this kernel has kernel TLS: -ktls=required would start")
	}
	var out strings.Builder
	err := startRun(runConfig{ProxyID: "web-sidecar-proxy", KTLS: ktls.Required, LogLevel: "info"}, &out)
	if err == nil || !strings.Contains(err.Error(), "-ktls=required") || !strings.Contains(err.Error(), "modprobe tls") {
		t.Fatalf("startRun with -ktls=required: %v; want the kernel TLS error naming the fix", err)
	}
	if !errors.Is(err, ktls.ErrUnsupported) {
		t.Fatalf("error %v does not wrap ktls.ErrUnsupported", err)
	}

	var log strings.Builder
	k, err := decideKTLS(t.Context(), runConfig{KTLS: ktls.Auto, Tunnels: true}, hclog.New(&hclog.LoggerOptions{Output: &log}))
	if err != nil || k.Use || k.Required {
		t.Fatalf("auto: %+v, %v; want user space, no error", k, err)
	}
	if got := log.String(); !strings.Contains(got, "kernel TLS not used") || !strings.Contains(got, "tls module is not loaded") {
		t.Fatalf("start log %q does not say why kernel TLS is not used", got)
	}
}
