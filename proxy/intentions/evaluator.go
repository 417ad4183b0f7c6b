package intentions

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"
)

// Wildcard matches any value of a source name or namespace.
const Wildcard = "*"

const defaultName = "default"

// Reasons that are not tied to an intention. ReasonDefault is the agent's
// own wording so that decisions read the same as /v1/agent/connect/authorize.
const (
	ReasonDefault   = "Default behavior configured by ACLs"
	ReasonNotLoaded = "intentions not loaded"
)

// Source identifies the client of an inbound connection, taken from its
// SPIFFE ID. Empty Namespace and Partition mean "default".
type Source struct {
	Name      string
	Namespace string
	Partition string
}

func (s Source) String() string {
	return nsOrDefault(s.Partition) + "/" + nsOrDefault(s.Namespace) + "/" + s.Name
}

// Decision is the verdict for one source. Intention describes the deciding
// intention in the agent's format; it is empty when the default decided.
type Decision struct {
	Allow     bool
	Reason    string
	Intention string
}

// NotLoaded is what a Watcher answers before it has seen any intentions:
// without the list there is no safe default, so it fails closed.
func NotLoaded() Decision { return Decision{Allow: false, Reason: ReasonNotLoaded} }

type nsName struct{ ns, name string }

type rule struct {
	ns, name string
	l7       bool
	d        Decision
}

// Evaluator answers Decide for one destination. It is immutable after
// NewEvaluator and safe for concurrent use.
//
// Compilation resolves, for every source spelled exactly in some intention,
// the full first-match walk (so wildcard intentions of higher precedence are
// honoured), and indexes the wildcard intentions by position. Decide is then
// one map lookup for known sources and at most three for unknown ones; it
// never allocates unless the source is in a foreign partition.
type Evaluator struct {
	rules    []rule
	exact    map[nsName]Decision
	nsWild   map[string]int // exact namespace, name "*": first rule index
	nameWild map[string]int // namespace "*", exact name (Consul rejects it; handled anyway)
	anyIdx   int            // first "*/*" rule, or len(rules)
	def      Decision
	l7       []string
	key      string
}

// NewEvaluator compiles the intentions of one destination. ixns must be in
// precedence order as IntentionMatch returns them; they are stably re-sorted
// by Precedence (descending) as a guard, which keeps the agent's tie order.
// defaultAllow is the decision when no intention matches.
//
// Matching follows the agent's ConnectAuthorize (Consul CE): the source must be
// in the destination's partition ("default"); an intention matches when its
// source namespace and name are equal to the client's or "*". Intentions
// from peers never match a local client. An intention with L7 Permissions
// denies, since an L4 proxy cannot enforce them.
func NewEvaluator(ixns []*api.Intention, defaultAllow bool) *Evaluator {
	sorted := slices.Clone(ixns)
	slices.SortStableFunc(sorted, func(a, b *api.Intention) int { return b.Precedence - a.Precedence })

	e := &Evaluator{
		exact:    map[nsName]Decision{},
		nsWild:   map[string]int{},
		nameWild: map[string]int{},
		def:      Decision{Allow: defaultAllow, Reason: ReasonDefault},
	}
	var key strings.Builder
	key.WriteString(strconv.FormatBool(defaultAllow))
	for _, ixn := range sorted {
		if ixn == nil || ixn.SourcePeer != "" || !isDefault(ixn.SourcePartition) {
			// Can never match a client of this (default-partition) destination.
			continue
		}
		r := rule{ns: nsOrDefault(ixn.SourceNS), name: ixn.SourceName, l7: len(ixn.Permissions) > 0}
		desc := Describe(ixn)
		r.d.Intention = desc
		if r.l7 {
			r.d.Reason = "Matched L7 intention: " + desc
			e.l7 = append(e.l7, desc)
		} else {
			r.d.Allow = ixn.Action == api.IntentionActionAllow
			r.d.Reason = "Matched L4 intention: " + desc
		}
		e.rules = append(e.rules, r)
		// The description covers source, destination, action and L7; it
		// is in the key so reasons never go stale after a change.
		key.WriteString("|" + strconv.Quote(desc) + ":" + strconv.FormatBool(r.d.Allow))
	}
	e.key = key.String()
	e.anyIdx = len(e.rules)
	for i, r := range e.rules {
		switch {
		case r.ns == Wildcard && r.name == Wildcard:
			e.anyIdx = min(e.anyIdx, i)
		case r.ns == Wildcard:
			if _, ok := e.nameWild[r.name]; !ok {
				e.nameWild[r.name] = i
			}
		case r.name == Wildcard:
			if _, ok := e.nsWild[r.ns]; !ok {
				e.nsWild[r.ns] = i
			}
		}
	}
	// An exact source is matched by its own first exact rule or by an
	// earlier wildcard one; resolve that once here so Decide needs one
	// lookup for it.
	for i, r := range e.rules {
		if r.ns == Wildcard || r.name == Wildcard {
			continue
		}
		k := nsName{r.ns, r.name}
		if _, ok := e.exact[k]; ok {
			continue
		}
		e.exact[k] = e.rules[e.firstWildcard(r.ns, r.name, i)].d
	}
	return e
}

// firstWildcard returns the lowest rule index among best and the wildcard
// rules matching ns/name.
func (e *Evaluator) firstWildcard(ns, name string, best int) int {
	best = min(best, e.anyIdx)
	if i, ok := e.nsWild[ns]; ok && i < best {
		best = i
	}
	if i, ok := e.nameWild[name]; ok && i < best {
		best = i
	}
	return best
}

// Decide returns the verdict for src.
func (e *Evaluator) Decide(src Source) Decision {
	if !isDefault(src.Partition) {
		return Decision{Reason: fmt.Sprintf("Mismatched partitions: %q != %q", strings.ToLower(src.Partition), defaultName)}
	}
	ns := nsOrDefault(src.Namespace)
	if d, ok := e.exact[nsName{ns, src.Name}]; ok {
		return d
	}
	// Not spelled exactly anywhere: only wildcard rules can match. The
	// length checks skip hashing for the maps that are usually empty.
	best := e.anyIdx
	if len(e.nsWild) > 0 {
		if i, ok := e.nsWild[ns]; ok && i < best {
			best = i
		}
	}
	if len(e.nameWild) > 0 {
		if i, ok := e.nameWild[src.Name]; ok && i < best {
			best = i
		}
	}
	if best < len(e.rules) {
		return e.rules[best].d
	}
	return e.def
}

// DefaultAllow reports the decision taken when no intention matches.
func (e *Evaluator) DefaultAllow() bool { return e.def.Allow }

// Len is the number of intentions that can match a client.
func (e *Evaluator) Len() int { return len(e.rules) }

// L7 lists the intentions with L7 Permissions, which this L4 proxy treats as
// deny; the Watcher logs them.
func (e *Evaluator) L7() []string { return slices.Clone(e.l7) }

// Equal reports whether e and o hold the same rules in the same order with
// the same default, i.e. give every source the same Decision.
func (e *Evaluator) Equal(o *Evaluator) bool {
	return e != nil && o != nil && e.key == o.key
}

// Describe formats an intention like the agent does in authorize reasons
// (structs.Intention.String in Consul).
func Describe(ixn *api.Intention) string {
	var b strings.Builder
	switch {
	case ixn.SourcePeer != "":
		b.WriteString("peer(" + ixn.SourcePeer + ")/")
	case ixn.SourcePartition != "":
		b.WriteString(ixn.SourcePartition + "/")
	}
	b.WriteString(ixn.SourceNS + "/" + ixn.SourceName + " => ")
	if ixn.DestinationPartition != "" {
		b.WriteString(ixn.DestinationPartition + "/")
	}
	b.WriteString(ixn.DestinationNS + "/" + ixn.DestinationName + " (")
	if ixn.ID != "" {
		b.WriteString("ID: " + ixn.ID + ", ")
	}
	b.WriteString("Precedence: " + strconv.Itoa(ixn.Precedence) + ", ")
	if n := len(ixn.Permissions); n > 0 {
		b.WriteString("Permissions: " + strconv.Itoa(n))
	} else {
		b.WriteString("Action: " + strings.ToUpper(string(ixn.Action)))
	}
	b.WriteString(")")
	return b.String()
}

func nsOrDefault(s string) string {
	if s == "" {
		return defaultName
	}
	return s
}

func isDefault(partition string) bool {
	return partition == "" || partition == defaultName || strings.EqualFold(partition, defaultName)
}
