package intentions

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
)

// Snapshot is one answer of the intentions source.
type Snapshot struct {
	// Intentions for the destination in precedence order.
	Intentions []*api.Intention
	// Index is the X-Consul-Index of the answer.
	Index uint64
	// DefaultAllow is the decision when no intention matches.
	DefaultAllow bool
}

// FetchFunc returns the intentions for the watched destination, blocking
// until the index moves past index (0 = answer at once) or a server-side
// timeout. It must return promptly when ctx is cancelled.
type FetchFunc func(ctx context.Context, index uint64) (Snapshot, error)

// DefaultWait is the blocking-query wait ConsulFetcher uses when given 0.
const DefaultWait = 5 * time.Minute

// ConsulFetcher watches the intentions of destination (a service name in
// the default namespace and partition) through the agent: GET
// /v1/connect/intentions/match?by=destination, served from the agent cache
// (which keeps its own blocking refresh, so a change wakes us promptly and
// the servers see one watch per agent, not per sidecar). The default
// decision comes from X-Consul-Default-ACL-Policy: deny only when the agent
// says "deny"; allow when it says "allow" or nothing (ACLs off).
func ConsulFetcher(client *api.Client, destination string, wait time.Duration) FetchFunc {
	if wait <= 0 {
		wait = DefaultWait
	}
	match := &api.IntentionMatch{By: api.IntentionMatchDestination, Names: []string{destination}}
	// The agent answers within wait plus its jitter (wait/16); past that the
	// agent is hung or the path to it is a black hole, which only a
	// deadline of our own detects.
	limit := wait + wait/16 + 15*time.Second
	return func(ctx context.Context, index uint64) (Snapshot, error) {
		ctx, cancel := context.WithTimeout(ctx, limit)
		defer cancel()
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: wait, UseCache: true}).WithContext(ctx)
		m, meta, err := client.Connect().IntentionMatch(match, q)
		if err != nil {
			return Snapshot{}, fmt.Errorf("intentions: match destination %s: %w", destination, err)
		}
		ixns, ok := m[destination]
		if !ok {
			return Snapshot{}, fmt.Errorf("intentions: match destination %s: no entry for it in the answer", destination)
		}
		return Snapshot{
			Intentions:   ixns,
			Index:        meta.LastIndex,
			DefaultAllow: meta.DefaultACLPolicy != "deny",
		}, nil
	}
}
