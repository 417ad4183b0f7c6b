package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// Registration is where the sidecar reads its own proxy registration (with
// central config merged), following it live.
type Registration interface {
	// Watch calls fn with every new version of the registration (the
	// first one included) until ctx is done; errors are logged and retried.
	Watch(ctx context.Context, log hclog.Logger, fn func(*api.AgentService))
	// String names the registration for logs.
	String() string
}

// AgentRegistration is a proxy registered with the local agent (VMs,
// Nomad, docker-compose): /v1/agent/service/:id.
type AgentRegistration struct {
	Agent *api.Agent
	ID    string
}

func (r AgentRegistration) Watch(ctx context.Context, log hclog.Logger, fn func(*api.AgentService)) {
	WatchService(ctx, r.Agent, r.ID, log, fn)
}

func (r AgentRegistration) String() string { return "agent service " + r.ID }

// CatalogRegistration is a proxy registered in the catalog only, as
// consul-k8s's endpoints controller registers pods (agentless): service ID
// on node Node, read from a server with
// /v1/catalog/node-services/<node>?merge-central-config, so that
// proxy-defaults and service-defaults apply as an agent would merge them.
type CatalogRegistration struct {
	Client *api.Client
	Node   string
	ID     string
	// Namespace and Partition (Enterprise) go into the query.
	Namespace, Partition string
}

func (r CatalogRegistration) String() string { return "catalog service " + r.Node + "/" + r.ID }

// Watch follows the registration with blocking queries on the node's
// services index. The datacenter of the node is set on the service's
// Datacenter field.
func (r CatalogRegistration) Watch(ctx context.Context, log hclog.Logger, fn func(*api.AgentService)) {
	var index uint64
	var last string
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		svc, next, err := r.read(ctx, index)
		if errors.Is(err, errNotRegistered) && next > 0 {
			// Block on the node's index until it appears.
			log.Warn("proxy registration not found; waiting for it", "registration", r.String())
			index = next
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, time.Second), 30*time.Second)
			log.Warn("reading proxy registration failed, retrying", "registration", r.String(), "error", err, "backoff", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			// A new server may be behind; start over rather than block
			// on an index it has not reached.
			index = 0
			continue
		}
		backoff = 0
		if next < index {
			next = 0 // index went backwards (snapshot restore): re-read
		}
		index = next
		sig := fmt.Sprintf("%+v", svc)
		if svc != nil && sig != last {
			last = sig
			fn(svc)
		}
	}
}

var errNotRegistered = errors.New("not registered")

// read returns the registration (nil while it does not exist) and the
// index to block on next.
func (r CatalogRegistration) read(ctx context.Context, index uint64) (*api.AgentService, uint64, error) {
	filter := "ID == " + strconv.Quote(r.ID)
	q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute, AllowStale: true,
		MergeCentralConfig: true, Filter: filter, Namespace: r.Namespace, Partition: r.Partition}).WithContext(ctx)
	ctx, cancel := context.WithTimeout(ctx, 6*time.Minute)
	defer cancel()
	q = q.WithContext(ctx)
	list, meta, err := r.Client.Catalog().NodeServiceList(url.PathEscape(r.Node), q)
	if err != nil {
		return nil, 0, fmt.Errorf("catalog node-services %s: %w", r.Node, err)
	}
	if list == nil || list.Node == nil {
		return nil, meta.LastIndex, fmt.Errorf("node %q is not in the catalog", r.Node)
	}
	for _, s := range list.Services {
		if s != nil && s.ID == r.ID {
			if s.Datacenter == "" {
				s.Datacenter = list.Node.Datacenter
			}
			return s, meta.LastIndex, nil
		}
	}
	return nil, meta.LastIndex, fmt.Errorf("service %q on node %q: %w", r.ID, r.Node, errNotRegistered)
}
