// Command app is the compose example's application: one static binary for
// the backend (answers "hello from <name>"), the frontend (answers with what
// a GET of -upstream returned) and the small tools the example needs in
// images without a shell: -wait (block until a URL answers 200), -get (one
// GET, exit status says how it went) and -pause (hold a network namespace).
//
// The app knows nothing about the mesh: it listens on 127.0.0.1 and calls its
// upstream by a plain http:// URL; ferry carries both over mTLS.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	var (
		listen   = flag.String("listen", "127.0.0.1:8080", "HTTP listen address")
		name     = flag.String("name", "backend", "name this instance answers with")
		upstream = flag.String("upstream", "", "URL the frontend calls for each request (empty: answer directly)")
		wait     = flag.String("wait", "", "before serving, wait until this URL answers 200 (e.g. the sidecar's /ready)")
		get      = flag.String("get", "", "GET this URL once, print the body and exit (status 0 on 200, 1 otherwise)")
		pause    = flag.Bool("pause", false, "do nothing until signalled (holds a pod's network namespace)")
		timeout  = flag.Duration("timeout", 5*time.Second, "per-request timeout for -get and -upstream calls")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	client := &http.Client{Timeout: *timeout}

	switch {
	case *get != "":
		body, err := fetch(ctx, client, *get)
		if err != nil {
			fmt.Fprintln(os.Stderr, "app:", err)
			os.Exit(1)
		}
		fmt.Print(body)
		return
	case *pause:
		<-ctx.Done()
		return
	}
	if *wait != "" {
		log.Printf("waiting for %s", *wait)
		for {
			if _, err := fetch(ctx, client, *wait); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if *upstream == "" {
			fmt.Fprintf(w, "hello from %s\n", *name)
			return
		}
		body, err := fetch(r.Context(), client, *upstream)
		if err != nil {
			log.Printf("call %s: %v", *upstream, err)
			http.Error(w, fmt.Sprintf("%s: call %s: %v", *name, *upstream, err), http.StatusBadGateway)
			return
		}
		fmt.Fprintf(w, "%s got: %s", *name, body)
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	log.Printf("%s listening on %s (upstream %q)", *name, *listen, *upstream)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}

func fetch(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}
