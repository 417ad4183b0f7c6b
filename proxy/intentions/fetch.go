package intentions

import (
	"context"
	"fmt"
	"sync"
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
	// DefaultSource says where DefaultAllow came from (one of the
	// DefaultFrom constants; bounded, so usable as a metric label).
	DefaultSource string
	// DefaultNote explains the choice for logs (e.g. why the agent's
	// configuration could not be read). Empty when there is nothing to say.
	DefaultNote string
}

// Where the default decision came from (Snapshot.DefaultSource).
const (
	DefaultFromFlag    = "flag"       // -default-intention-policy
	DefaultFromAgent   = "agent"      // the agent's default_intention_policy (Consul >= 1.18)
	DefaultFromACL     = "acl"        // X-Consul-Default-ACL-Policy (Consul < 1.18 semantics)
	DefaultFromUnknown = "unknown"    // nothing established it: deny
	DefaultFromTest    = "configured" // set directly by the Fetch of a test or embedder
)

// Policy is an explicit default intention policy. The zero value means
// "ask Consul".
type Policy string

// Policies.
const (
	PolicyFromConsul Policy = ""
	PolicyAllow      Policy = "allow"
	PolicyDeny       Policy = "deny"
)

// ParsePolicy parses a -default-intention-policy value ("" = from Consul).
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case PolicyFromConsul, PolicyAllow, PolicyDeny:
		return p, nil
	}
	return "", fmt.Errorf("default intention policy %q: want allow or deny", s)
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
// the servers see one watch per agent, not per sidecar).
//
// The default decision, when no intention matches, is established the way
// the agent's own authorize endpoint does it, after an explicit policy:
//  1. policy, when not PolicyFromConsul (the operator's word wins);
//  2. the agent's default_intention_policy (Consul >= 1.18), read once
//     from GET /v1/agent/self DebugConfig.DefaultIntentionPolicy (needs
//     agent:read; retried on every fetch until it answers);
//  3. X-Consul-Default-ACL-Policy, the ACL default policy, which is all
//     Consul < 1.18 uses (the agent sends it on every answer, "allow" with
//     ACLs off);
//  4. otherwise deny: a default nobody stated is not an allow.
//
// Without agent:read a >= 1.18 agent's default_intention_policy cannot be
// seen; the note says so and the operator should set the policy explicitly.
func ConsulFetcher(client *api.Client, destination string, wait time.Duration, policy Policy) FetchFunc {
	if wait <= 0 {
		wait = DefaultWait
	}
	match := &api.IntentionMatch{By: api.IntentionMatchDestination, Names: []string{destination}}
	// The agent answers within wait plus its jitter (wait/16); past that the
	// agent is hung or the path to it is a black hole, which only a
	// deadline of our own detects.
	limit := wait + wait/16 + 15*time.Second
	agent := &agentPolicy{client: client}
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
		snap := Snapshot{Intentions: ixns, Index: meta.LastIndex}
		if policy != PolicyFromConsul {
			snap.DefaultAllow, snap.DefaultSource = policy == PolicyAllow, DefaultFromFlag
			return snap, nil
		}
		snap.DefaultAllow, snap.DefaultSource, snap.DefaultNote = resolveDefault(agent.get(ctx), meta.DefaultACLPolicy)
		return snap, nil
	}
}

// agentPolicy caches the agent's default_intention_policy once read: it is
// agent configuration, which changes only with an agent restart.
type agentPolicy struct {
	client *api.Client
	mu     sync.Mutex
	known  bool
	value  string
}

// agentAnswer is what agent/self said: the setting ("" = not set or Consul
// < 1.18) or why it could not be read.
type agentAnswer struct {
	value string
	err   error
}

func (a *agentPolicy) get(ctx context.Context) agentAnswer {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.known {
		return agentAnswer{value: a.value}
	}
	var self struct{ DebugConfig map[string]any }
	if _, err := a.client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return agentAnswer{err: err}
	}
	v, ok := self.DebugConfig["DefaultIntentionPolicy"]
	switch s, isString := v.(string); {
	case !ok || v == nil:
		// Consul < 1.18 has no such setting.
	case !isString:
		return agentAnswer{err: fmt.Errorf("DebugConfig.DefaultIntentionPolicy is a %T", v)}
	default:
		a.value = s
	}
	a.known = true
	return agentAnswer{value: a.value}
}

// resolveDefault applies steps 2-4 of ConsulFetcher's order.
func resolveDefault(agent agentAnswer, aclHeader string) (allow bool, source, note string) {
	if agent.err != nil {
		note = fmt.Sprintf("cannot read the agent's default_intention_policy (GET /v1/agent/self needs agent:read): %v; "+
			"set -default-intention-policy if the agent (Consul >= 1.18) sets it", agent.err)
	}
	switch agent.value {
	case "":
	case string(PolicyAllow), string(PolicyDeny):
		return agent.value == string(PolicyAllow), DefaultFromAgent, ""
	default:
		return false, DefaultFromUnknown, fmt.Sprintf("the agent's default_intention_policy %q is neither allow nor deny: denying", agent.value)
	}
	switch aclHeader {
	case string(PolicyAllow), string(PolicyDeny):
		return aclHeader == string(PolicyAllow), DefaultFromACL, note
	}
	if note != "" {
		note += "; "
	}
	return false, DefaultFromUnknown, note + fmt.Sprintf("no usable X-Consul-Default-ACL-Policy (%q) either: denying", aclHeader)
}
