package catalog

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// DialFunc opens a connection (normally mTLS, handshake included) to one
// instance. Its error makes Dial try another instance.
type DialFunc func(ctx context.Context, in Instance) (net.Conn, error)

// Dial connects to a passing instance of svc, balancing across instances
// and retrying others (up to Options.MaxAttempts) when dial fails or
// exceeds Options.DialTimeout; a failed instance is avoided for a backoff.
// svc.Datacenter selects a remote datacenter ("" = local).
//
// The returned conn wraps dial's conn to count open connections per
// instance: Close it exactly as usual. It forwards CloseWrite when the
// underlying conn has it, and NetConn returns the underlying conn.
func (v *View) Dial(ctx context.Context, svc Service, dial DialFunc) (net.Conn, Instance, error) {
	w, err := v.watchFor(ctx, svc)
	if err != nil {
		return nil, Instance{}, fmt.Errorf("catalog: dial %s: %w", svc.Name, err)
	}
	w.lastUsed.Store(time.Now().UnixNano())
	var errs []error
	tried := make(map[*instState]bool, v.o.MaxAttempts)
	for attempt := 0; attempt < v.o.MaxAttempts; attempt++ {
		s := w.pick(tried, time.Now())
		if s == nil {
			break
		}
		tried[s] = true
		s.active.Add(1)
		w.active.Add(1)
		actx, cancel := context.WithTimeout(ctx, v.o.DialTimeout)
		c, err := dial(actx, s.Instance)
		cancel()
		if err == nil {
			w.succeeded(s)
			return track(c, w, s), s.Instance, nil
		}
		s.active.Add(-1)
		w.active.Add(-1)
		if ctx.Err() != nil {
			// The caller gave up; that says nothing about the instance.
			return nil, Instance{}, fmt.Errorf("catalog: dial %s: %w", svc.Name, ctx.Err())
		}
		w.failed(s, time.Now(), v.o.FailBackoff, v.o.FailBackoffMax)
		v.log.Debug("instance dial failed; trying another", "service", svc.Name, "instance", s.ID,
			"addr", s.Addr, "error", err)
		errs = append(errs, fmt.Errorf("%s (%s): %w", s.ID, s.Addr, err))
	}
	if len(errs) == 0 {
		return nil, Instance{}, fmt.Errorf("catalog: dial %s: %w", svc.Name, ErrNoInstances)
	}
	return nil, Instance{}, fmt.Errorf("catalog: dial %s: %d attempts failed: %w", svc.Name, len(errs), errors.Join(errs...))
}

type trackedConn struct {
	net.Conn
	once sync.Once
	w    *instWatch
	s    *instState
}

func (c *trackedConn) release() {
	c.once.Do(func() {
		c.s.active.Add(-1)
		c.w.active.Add(-1)
	})
}

func (c *trackedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// NetConn returns the conn that dial returned.
func (c *trackedConn) NetConn() net.Conn { return c.Conn }

type trackedHalfConn struct{ *trackedConn }

type closeWriter interface{ CloseWrite() error }

func (c trackedHalfConn) CloseWrite() error { return c.Conn.(closeWriter).CloseWrite() }

func track(c net.Conn, w *instWatch, s *instState) net.Conn {
	t := &trackedConn{Conn: c, w: w, s: s}
	if _, ok := c.(closeWriter); ok {
		return trackedHalfConn{t}
	}
	return t
}
