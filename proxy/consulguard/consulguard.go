// Package consulguard bounds what a Consul HTTP API answer may cost ferry:
// a RoundTripper under consul/api's client that caps a response body's
// size, the time its body may take once the headers are in, and the time a
// request may wait for its headers (a blocking query's wait plus the
// agent's jitter, not forever). consul/api decodes bodies without any
// limit (and reads a whole error body into memory), so a broken or
// hostile agent answering with a huge or endless body would otherwise grow
// ferry's memory without bound, and one that never answers a blocking
// query would freeze a watch for good.
//
// A request that crosses a limit fails with an error that says which;
// the watch that made it logs it and retries with its backoff, keeping the
// state it had (ferry stays fail-closed: what was never loaded is refused).
//
// Rules: imports nothing of ferry's.
package consulguard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Config holds the limits; zero values take the defaults.
type Config struct {
	// MaxBody is the largest response body accepted (default 16 MiB:
	// registrations, certificates, intentions and config entry lists are
	// far smaller, even for tens of thousands of services).
	MaxBody int64
	// LargeBody is the limit for the paths in Large (default 256 MiB).
	LargeBody int64
	// Large are the path prefixes whose answers grow with the whole
	// catalog (default: the node dump, /v1/internal/ui/nodes, about 1 KiB
	// per service instance and sidecar).
	Large []string
	// BodyTimeout is how long a body may take once the headers are in
	// (default 1 min; an agent sends a blocking query's answer at once).
	BodyTimeout time.Duration
	// HeaderTimeout is how long a request without a wait may take to get
	// its headers (default 1 min). A blocking query (?wait=) gets its wait
	// plus wait/16 (the agent's jitter) plus HeaderTimeout.
	HeaderTimeout time.Duration
}

// ErrBodyTooLarge is returned by a body that crossed MaxBody.
var ErrBodyTooLarge = errors.New("consul response body over the size limit")

// ErrTimeout is the cause when a request or its body took too long.
var ErrTimeout = errors.New("consul request timed out")

// Transport is the guarding RoundTripper.
type Transport struct {
	base http.RoundTripper
	cfg  Config
}

// New wraps base (nil: http.DefaultTransport).
func New(base http.RoundTripper, cfg Config) *Transport {
	if base == nil {
		base = http.DefaultTransport
	}
	if cfg.MaxBody <= 0 {
		cfg.MaxBody = 16 << 20
	}
	if cfg.LargeBody <= 0 {
		cfg.LargeBody = 256 << 20
	}
	if cfg.Large == nil {
		cfg.Large = []string{"/v1/internal/ui/nodes"}
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = time.Minute
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = time.Minute
	}
	return &Transport{base: base, cfg: cfg}
}

// RoundTrip runs req under the limits.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	headerLimit := t.cfg.HeaderTimeout
	if w := req.URL.Query().Get("wait"); w != "" {
		if d, err := time.ParseDuration(w); err == nil && d > 0 {
			headerLimit += d + d/16
		}
	}
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := time.AfterFunc(headerLimit, func() {
		cancel(fmt.Errorf("%w: no answer to %s %s within %v", ErrTimeout, req.Method, req.URL.Path, headerLimit))
	})
	resp, err := t.base.RoundTrip(req.WithContext(ctx))
	if !timer.Stop() || err != nil {
		timer.Stop()
		if cause := context.Cause(ctx); errors.Is(cause, ErrTimeout) {
			err = cause
		}
		cancel(nil)
		if resp != nil {
			resp.Body.Close()
		}
		if err == nil {
			err = context.Cause(ctx)
		}
		return nil, err
	}
	limit := t.cfg.MaxBody
	for _, p := range t.cfg.Large {
		if strings.HasPrefix(req.URL.Path, p) {
			limit = t.cfg.LargeBody
		}
	}
	if resp.ContentLength > limit {
		resp.Body.Close()
		cancel(nil)
		return nil, fmt.Errorf("%w: %s %s: %d bytes announced, limit %d", ErrBodyTooLarge, req.Method, req.URL.Path, resp.ContentLength, limit)
	}
	b := &body{rc: resp.Body, left: limit, max: limit, ctx: ctx, cancel: cancel, what: req.Method + " " + req.URL.Path}
	if resp.StatusCode/100 != 2 {
		// consul/api copies an error body whole into its error message
		// (ignoring read errors), which the caller logs: keep the start.
		b.left, b.truncate = maxErrorBody, true
	}
	b.timer = time.AfterFunc(t.cfg.BodyTimeout, func() {
		cancel(fmt.Errorf("%w: body of %s not complete within %v", ErrTimeout, b.what, t.cfg.BodyTimeout))
	})
	resp.Body = b
	return resp, nil
}

// maxErrorBody is how much of a non-2xx answer's body is kept.
const maxErrorBody = 4 << 10

// body enforces the size cap and ends the request's context when done.
type body struct {
	rc       io.ReadCloser
	left     int64
	truncate bool // past the cap: a clean end (error bodies), not an error
	max      int64
	what     string
	ctx      context.Context
	cancel   context.CancelCauseFunc
	timer    *time.Timer
	once     sync.Once
}

func (b *body) Read(p []byte) (int, error) {
	if b.truncate && b.left <= 0 {
		return 0, io.EOF
	}
	if b.truncate && int64(len(p)) > b.left {
		p = p[:b.left]
	}
	if b.left <= 0 {
		// One byte past the limit tells a body of exactly max bytes from
		// a longer one.
		var one [1]byte
		if n, _ := b.rc.Read(one[:]); n > 0 {
			return 0, fmt.Errorf("%w: %s: more than %d bytes", ErrBodyTooLarge, b.what, b.max)
		}
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	if int64(n) > b.left && !b.truncate {
		return 0, fmt.Errorf("%w: %s: more than %d bytes", ErrBodyTooLarge, b.what, b.max)
	}
	b.left -= int64(n)
	if err != nil && err != io.EOF {
		if cause := context.Cause(b.ctx); errors.Is(cause, ErrTimeout) {
			err = cause
		}
	}
	return n, err
}

func (b *body) Close() error {
	err := b.rc.Close()
	b.once.Do(func() {
		b.timer.Stop()
		b.cancel(nil)
	})
	return err
}
