package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/proxy"
	"github.com/hashicorp/go-hclog"
)

// Lifecycle as consul-dataplane's: POST /quitquitquit on the admin
// listener exits at once; a lifecycle listener (-graceful-addr) serves
// /graceful_shutdown and /graceful_startup; -check-proxy-health probes the
// admin /ready.

// checkProxyHealth GETs the admin /ready (3 s timeout, as consul-dataplane);
// nil only on 200.
func checkProxyHealth(adminAddr string) error {
	c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	resp, err := c.Get("http://" + adminAddr + "/ready")
	if err != nil {
		return fmt.Errorf("check-proxy-health: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("check-proxy-health: %s/ready: %s", adminAddr, resp.Status)
	}
	return nil
}

// lifecycle carries the requests that end the process.
type lifecycle struct {
	quit               chan struct{} // /quitquitquit: exit now
	shutdown           chan struct{} // /graceful_shutdown: the SIGTERM sequence
	quitOnce, shutOnce sync.Once
	// started: the listener is up (agentless starts it before the login,
	// serve must not start it again).
	started bool
}

func newLifecycle() *lifecycle {
	return &lifecycle{quit: make(chan struct{}), shutdown: make(chan struct{})}
}

// admin adds POST /quitquitquit to the admin handler.
func (l *lifecycle) admin(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("POST /quitquitquit", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		l.quitOnce.Do(func() { close(l.quit) })
	})
	return mux
}

// server is the lifecycle listener's handler: /graceful_shutdown starts
// the graceful shutdown and answers at once; /graceful_startup answers 200
// once the proxy is ready, or 503 after the startup grace period.
func (l *lifecycle) server(cfg runConfig, ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(cfg.GracefulShutdownPath, func(w http.ResponseWriter, r *http.Request) {
		l.shutOnce.Do(func() { close(l.shutdown) })
		w.WriteHeader(http.StatusOK)
	})
	mux.HandleFunc(cfg.GracefulStartupPath, func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), max(cfg.StartupGracePeriod, 0))
		defer cancel()
		for {
			err := ready()
			if err == nil {
				w.WriteHeader(http.StatusOK)
				return
			}
			select {
			case <-ctx.Done():
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	})
	return mux
}

// start starts the lifecycle listener when configured and not yet
// started (nil, nil when not).
func (l *lifecycle) start(cfg runConfig, ready func() error, log hclog.Logger) (*proxy.Admin, error) {
	if cfg.GracefulAddr == "" || l.started {
		return nil, nil
	}
	l.started = true
	a, err := proxy.StartAdmin(cfg.GracefulAddr, l.server(cfg, ready), log)
	if err != nil {
		return nil, fmt.Errorf("lifecycle listener: %w", err)
	}
	log.Info("lifecycle listening", "addr", a.Addr(), "shutdown_path", cfg.GracefulShutdownPath, "startup_path", cfg.GracefulStartupPath)
	return a, nil
}

// startAdmin starts the admin listener (with POST /quitquitquit) and,
// with -ready-addr, the readiness listener serving GET /ready alone. They
// open together, so the kubelet sees "not ready" rather than a refused
// connection while ferry starts. The returned func closes both.
func startAdmin(cfg runConfig, l *lifecycle, ready func() error, metrics proxy.Collector, log hclog.Logger) (func(), error) {
	admin, err := proxy.StartAdmin(cfg.AdminAddr, l.admin(proxy.AdminHandler(ready, metrics)), log.Named("admin"))
	if err != nil {
		return nil, err
	}
	log.Info("admin listening", "addr", admin.Addr())
	if cfg.ReadyAddr == "" {
		return func() { admin.Close() }, nil
	}
	rd, err := proxy.StartAdmin(cfg.ReadyAddr, proxy.ReadyHandler(ready), log.Named("ready"))
	if err != nil {
		admin.Close()
		return nil, fmt.Errorf("readiness listener: %w", err)
	}
	log.Info("readiness listening", "addr", rd.Addr(), "path", "/ready")
	return func() { rd.Close(); admin.Close() }, nil
}

func joinHostPort(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }
