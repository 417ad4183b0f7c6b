package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"
)

// AdminHandler serves GET /ready (200 "ready", or 503 with the reason from
// ready) and GET /metrics (Prometheus text format).
func AdminHandler(ready func() error, metrics Collector) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ready", readyFunc(ready))
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		metrics.WritePrometheus(w)
	})
	return mux
}

// ReadyHandler serves GET /ready alone, as AdminHandler does; every other
// path is 404. It is for a listener off loopback (the kubelet's readiness
// probe on the pod IP), where the metrics have no business.
func ReadyHandler(ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ready", readyFunc(ready))
	return mux
}

func readyFunc(ready func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if err := ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
		fmt.Fprintln(w, "ready")
	}
}

// Admin is the admin HTTP server.
type Admin struct {
	srv  *http.Server
	ln   net.Listener
	done chan struct{}
}

// StartAdmin listens on addr and serves h until Close.
func StartAdmin(addr string, h http.Handler, log hclog.Logger) (*Admin, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listener: %w", err)
	}
	a := &Admin{
		srv: &http.Server{
			Handler:           h,
			ReadHeaderTimeout: 5 * time.Second,
			ErrorLog:          log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
		},
		ln:   ln,
		done: make(chan struct{}),
	}
	go func() {
		defer close(a.done)
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin server stopped", "error", err)
		}
	}()
	return a, nil
}

// Addr is the bound address.
func (a *Admin) Addr() net.Addr { return a.ln.Addr() }

// Close stops the server (waiting briefly for in-flight scrapes).
func (a *Admin) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := a.srv.Shutdown(ctx)
	if err != nil {
		err = a.srv.Close()
	}
	<-a.done
	return err
}
