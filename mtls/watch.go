package mtls

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// WatchOptions tune Watch; the zero value is fine.
type WatchOptions struct {
	Logger hclog.Logger
	// Query is copied into every request (token, namespace, partition...);
	// WaitIndex and WaitTime are managed by Watch.
	Query api.QueryOptions
	// WaitTime is the blocking-query wait (default 5m, the agent's default).
	WaitTime time.Duration
	// MinBackoff and MaxBackoff bound the retry delay after errors
	// (defaults 500ms and 30s; it doubles per consecutive failure, with jitter).
	MinBackoff, MaxBackoff time.Duration
	// MinInterval is the least time between two requests that return the
	// same index, so a misbehaving agent cannot make us spin (default 1s).
	MinInterval time.Duration
}

func (o *WatchOptions) defaults() {
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	if o.WaitTime <= 0 {
		o.WaitTime = 5 * time.Minute
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 500 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(30*time.Second, o.MinBackoff)
	}
	if o.MinInterval <= 0 {
		o.MinInterval = time.Second
	}
}

// Watch keeps the identity's leaf (for the destination service name
// `service`, not the proxy's name or ID) and its roots current with
// blocking queries against the local agent until ctx is done. It returns
// only after both of its loops have stopped, with ctx's error. Errors are
// retried with backoff; the identity keeps serving the last good leaf and
// roots meanwhile and Status reports the last error.
func (id *Identity) Watch(ctx context.Context, client *api.Client, service string, opts WatchOptions) error {
	if client == nil || service == "" {
		return errors.New("mtls: watch: need a Consul client and a service name")
	}
	opts.defaults()
	log := opts.Logger.Named("identity")
	agent := client.Agent()

	var wg sync.WaitGroup
	wg.Go(func() {
		var last string
		watchLoop(ctx, "leaf", log.With("service", service), opts, func(q *api.QueryOptions) (uint64, error) {
			leaf, meta, err := agent.ConnectCALeaf(service, q)
			if err != nil {
				err = fmt.Errorf("fetch leaf for %q: %w", service, err)
				id.setErr(&id.leafErr, err)
				return 0, err
			}
			if leaf.CertPEM+leaf.PrivateKeyPEM == last {
				id.setErr(&id.leafErr, nil)
				return meta.LastIndex, nil
			}
			if err := id.SetLeaf([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM)); err != nil {
				// Keep the index: the agent will not serve another cert
				// for this one, and retrying in a loop would not help.
				log.Error("bad leaf from agent; keeping the previous one", "service", service, "error", err)
				return meta.LastIndex, nil
			}
			last = leaf.CertPEM + leaf.PrivateKeyPEM
			l := id.Leaf()
			log.Info("leaf certificate loaded", "id", l.ID.String(), "serial", l.Serial,
				"not_after", l.NotAfter.UTC().Format(time.RFC3339), "index", meta.LastIndex)
			return meta.LastIndex, nil
		})
	})
	wg.Go(func() {
		var last string
		watchLoop(ctx, "roots", log, opts, func(q *api.QueryOptions) (uint64, error) {
			list, meta, err := agent.ConnectCARoots(q)
			if err != nil {
				err = fmt.Errorf("fetch CA roots: %w", err)
				id.setErr(&id.rootsErr, err)
				return 0, err
			}
			pems := make([][]byte, 0, len(list.Roots))
			sig := list.TrustDomain
			for _, r := range list.Roots {
				if r == nil {
					continue
				}
				pems = append(pems, []byte(r.RootCertPEM))
				sig += "\x00" + r.RootCertPEM
			}
			if sig == last {
				id.setErr(&id.rootsErr, nil)
				return meta.LastIndex, nil
			}
			if err := id.SetRoots(list.TrustDomain, pems...); err != nil {
				log.Error("bad CA roots from agent; keeping the previous ones", "error", err)
				return meta.LastIndex, nil
			}
			last = sig
			log.Info("CA roots loaded", "trust_domain", list.TrustDomain, "roots", len(pems),
				"active", list.ActiveRootID, "index", meta.LastIndex)
			return meta.LastIndex, nil
		})
	})
	wg.Wait()
	return ctx.Err()
}

func (id *Identity) setErr(dst *error, err error) {
	id.mu.Lock()
	*dst = err
	id.mu.Unlock()
}

// watchLoop runs fetch as a blocking query until ctx is done. fetch returns
// the response's index (X-Consul-Index) or an error.
func watchLoop(ctx context.Context, what string, log hclog.Logger, o WatchOptions,
	fetch func(*api.QueryOptions) (uint64, error)) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		q := o.Query // copy
		q.WaitIndex, q.WaitTime = index, o.WaitTime
		start := time.Now()
		// The agent answers a blocking query within WaitTime plus up to
		// WaitTime/16 of jitter; a hung agent or a dead TCP path must not
		// hold the watch forever.
		rctx, cancel := context.WithTimeout(ctx, o.WaitTime+o.WaitTime/16+10*time.Second)
		next, err := fetch(q.WithContext(rctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			d := backoff(o.MinBackoff, o.MaxBackoff, failures)
			// The first failure is often the agent not being up yet; say
			// so quietly and loudly only when it persists.
			lvl := hclog.Warn
			if failures == 1 {
				lvl = hclog.Debug
			}
			log.Log(lvl, "watch failed; retrying", "what", what, "error", err, "failures", failures, "retry_in", d)
			// A failure may mean the agent restarted with a new raft
			// history; start over rather than wait on an index that may
			// never come.
			index = 0
			if !sleep(ctx, d) {
				return
			}
			continue
		}
		failures = 0
		switch {
		case next == 0:
			// Never block on 0: that returns at once, a tight loop.
			next = 1
		case next < index:
			// The index went backwards (agent restart, snapshot restore):
			// the result we just got is current, so block from its index.
			log.Debug("index went backwards; resetting", "what", what, "from", index, "to", next)
		}
		if next == index && time.Since(start) < o.MinInterval {
			if !sleep(ctx, o.MinInterval-time.Since(start)) {
				return
			}
		}
		index = next
	}
}

// backoff returns min·2^(n-1) capped at max, with up to 25 % jitter off so
// sidecars restarted together do not retry in lockstep.
func backoff(lo, hi time.Duration, n int) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d - time.Duration(rand.Int64N(int64(d)/4+1))
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
