package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// -check-proxy-health (both command lines) exits 0 only when the admin
// /ready answers 200.
func TestCheckProxyHealth(t *testing.T) {
	var ready atomic.Bool
	admin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ready" || r.Method != http.MethodGet {
			http.NotFound(w, r)
			return
		}
		if !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	}))
	t.Cleanup(admin.Close)
	addr := strings.TrimPrefix(admin.URL, "http://")
	host, port, _ := net.SplitHostPort(addr)
	runs := map[string]func() error{
		"ferry run -check-proxy-health": func() error {
			return runRun([]string{"-check-proxy-health", "-admin-addr", addr}, io.Discard, io.Discard)
		},
		"ferry -check-proxy-health (consul-dataplane)": func() error {
			return runDataplane([]string{"-check-proxy-health", "-envoy-admin-bind-address", host, "-envoy-admin-bind-port", port}, io.Discard, io.Discard)
		},
	}
	for name, run := range runs {
		ready.Store(false)
		if err := run(); err == nil {
			t.Errorf("%s before ready: exit 0", name)
		}
		ready.Store(true)
		if err := run(); err != nil {
			t.Errorf("%s when ready: %v", name, err)
		}
	}
	// Nothing listening: not healthy.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	if err := checkProxyHealth(dead); err == nil {
		t.Error("no admin listener: healthy")
	}
}

func TestQuitQuitQuit(t *testing.T) {
	lc := newLifecycle()
	h := lc.admin(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "admin") }))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/quitquitquit", nil))
	select {
	case <-lc.quit:
		t.Fatal("GET /quitquitquit quits")
	default:
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/ready", nil))
	if rec.Body.String() != "admin" {
		t.Fatalf("admin handler not reached: %q", rec.Body.String())
	}
	for range 2 { // twice: no panic
		rec = httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/quitquitquit", nil))
		if rec.Code != 200 {
			t.Fatalf("POST /quitquitquit: %d", rec.Code)
		}
	}
	select {
	case <-lc.quit:
	default:
		t.Fatal("POST /quitquitquit did not quit")
	}
}

func TestLifecyclePaths(t *testing.T) {
	lc := newLifecycle()
	cfg := runConfig{GracefulShutdownPath: "/graceful_shutdown", GracefulStartupPath: "/graceful_startup", StartupGracePeriod: 300 * time.Millisecond}
	var ready atomic.Bool
	h := lc.server(cfg, func() error {
		if ready.Load() {
			return nil
		}
		return errors.New("catalog not loaded")
	})
	rec := httptest.NewRecorder()
	start := time.Now()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/graceful_startup", nil))
	if rec.Code != 503 || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("startup before ready: %d after %v", rec.Code, time.Since(start))
	}
	cfg.StartupGracePeriod = 10 * time.Second
	h = lc.server(cfg, func() error {
		if ready.Load() {
			return nil
		}
		return errors.New("catalog not loaded")
	})
	time.AfterFunc(200*time.Millisecond, func() { ready.Store(true) })
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/graceful_startup", nil))
	if rec.Code != 200 {
		t.Fatalf("startup once ready: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/graceful_shutdown", nil))
	select {
	case <-lc.shutdown:
	default:
		t.Fatal("graceful_shutdown did not start the shutdown")
	}
}

func TestDataplaneLifecycleMapping(t *testing.T) {
	cfg, _, err := parseDataplane([]string{"-addresses", "consul", "-service-node-name", "n", "-proxy-service-id", "p",
		"-graceful-port", "20600", "-shutdown-grace-period-seconds", "30", "-startup-grace-period-seconds", "5"},
		func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.GracefulAddr != "127.0.0.1:20600" || cfg.ShutdownGracePeriod != 30*time.Second || cfg.StartupGracePeriod != 5*time.Second ||
		cfg.GracefulShutdownPath != "/graceful_shutdown" || cfg.GracefulStartupPath != "/graceful_startup" {
		t.Fatalf("mapped: %+v", cfg)
	}
	cfg, _, err = parseDataplane([]string{"-addresses", "consul", "-service-node-name", "n", "-proxy-service-id", "p"},
		func(string) string { return "" }, io.Discard)
	if err != nil || cfg.GracefulAddr != "" {
		t.Fatalf("no lifecycle flags: listener %q, %v", cfg.GracefulAddr, err)
	}
}

// The injector's sidecar runs `/ferry run` with consul-dataplane's
// arguments: they are parsed as such, not refused as unknown run flags.
func TestRunTakesDataplaneArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{[]string{"-addresses=consul", "-graceful-port=20600"}, true},
		{[]string{"-graceful-port", "20600", "--addresses", "consul"}, true},
		{[]string{"-proxy-id", "web-sidecar-proxy"}, false},
		{[]string{"-proxy-id", "x", "--", "-addresses"}, false},
	} {
		if got := dataplaneArgs(tc.args); got != tc.want {
			t.Errorf("dataplaneArgs(%q) = %v", tc.args, got)
		}
	}
	// Parsed by the dataplane parser: its own usage error, not "flag
	// provided but not defined: -addresses".
	err := runRun([]string{"-addresses=consul", "-proxy-service-id=p"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "service-node-name") {
		t.Fatalf("ferry run with consul-dataplane args: %v", err)
	}
}
