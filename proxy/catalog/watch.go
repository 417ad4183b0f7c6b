package catalog

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

// blockingLoop runs fetch as a blocking query until ctx ends. fetch receives
// the last index and returns the new one. It follows Consul's client hygiene:
// reset the index when it goes backwards, never send 0 in a tight loop, back
// off (with jitter) on errors and then re-read without blocking, and
// rate-limit calls that return at once.
//
// rs is the view's resync (see there); nil for a watch whose index is not
// the local servers' (another datacenter's instances), which neither
// follows nor triggers it.
func blockingLoop(ctx context.Context, o *Options, rs *resync, name string, fetch func(ctx context.Context, index uint64) (uint64, error)) {
	var index, gen uint64
	gctx := context.Background() // never ends without a resync
	failures := 0
	for ctx.Err() == nil {
		if rs != nil {
			var g uint64
			g, gctx = rs.current()
			if g != gen {
				index, gen = 0, g // the agent went away: start over (see resync)
			}
		}
		start := time.Now()
		// Bound each call past the server's wait (plus its jitter of up to
		// wait/16) so a hung connection, e.g. a frozen agent, cannot stall
		// the watch forever.
		cctx, cancel := context.WithTimeout(ctx, o.WaitTime+o.WaitTime/16+10*time.Second)
		stop := context.AfterFunc(gctx, cancel)
		next, err := fetch(cctx, index)
		stop()
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if gctx.Err() != nil {
				continue // cut short by a resync: re-read at once
			}
			// Only an agent that went away or hung can have left the
			// other watches blocked at indexes it no longer has. An HTTP
			// answer about this one query (no path to a datacenter, a
			// 403, no leader) says the agent is there: back off this
			// watch alone (audit F7).
			gone := agentGone(err)
			if gone && rs != nil {
				rs.trigger(gen)
			}
			index = 0 // re-read without blocking once it works again
			failures++
			d := backoff(o.RetryMin, o.RetryMax, failures)
			if failures == 1 || failures%10 == 0 {
				o.Logger.Warn("watch failed; retrying", "watch", name, "error", err, "retry_in", d, "failures", failures,
					"agent_unreachable", gone)
			}
			sleep(ctx, d)
			continue
		}
		if failures > 0 {
			o.Logger.Info("watch recovered", "watch", name, "failures", failures)
			failures = 0
		}
		switch {
		case next < index:
			// Backwards: a restore, or a stale read from a server that
			// lags the one before (expected with AllowStale). Start this
			// watch over; it is no sign the agent changed.
			index = 0
		case next == 0:
			index = 1
		default:
			index = next
		}
		// A blocking query that returns immediately with no change would
		// otherwise spin; one that returned a change is not delayed much.
		if el := time.Since(start); el < o.MinInterval {
			sleep(ctx, o.MinInterval-el)
		}
	}
}

// agentGone reports whether err says the agent could not be reached or
// did not answer (refused, reset, EOF, timeout), as opposed to an HTTP
// answer about one query.
func agentGone(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{context.DeadlineExceeded, syscall.ECONNREFUSED, syscall.ECONNRESET,
		syscall.ECONNABORTED, syscall.EPIPE, io.EOF, io.ErrUnexpectedEOF} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func backoff(min, max time.Duration, failures int) time.Duration {
	d := min
	for i := 1; i < failures && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	// Full jitter on the upper half keeps many sidecars from retrying in step.
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// resync makes a view's watches start over together. An agent restart
// may bring a catalog whose indexes are lower than the ones the watches
// hold, and Consul blocks a query until its index passes the one asked
// for: a watch that was between queries when the agent went away never
// sees an error and would send its old index to the new agent, then sit
// out the whole wait (minutes) on a stale view. A watch that finds the
// agent unreachable (agentGone) therefore ends the current generation:
// queries in flight are cancelled and every local watch re-reads from
// index 0. Errors about one query do not: they say nothing about the
// others, and a permanent one would make every retry re-read everything.
type resync struct {
	mu     sync.Mutex
	gen    uint64
	ctx    context.Context
	cancel context.CancelFunc
}

func newResync() *resync {
	r := &resync{}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r
}

// current returns the generation and a context that ends with it.
func (r *resync) current() (uint64, context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gen, r.ctx
}

// trigger ends generation gen, unless another failure already did.
func (r *resync) trigger(gen uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gen != gen {
		return
	}
	r.cancel()
	r.gen++
	r.ctx, r.cancel = context.WithCancel(context.Background())
}
