// Package catalog is the sidecar's view of the mesh for outbound routing and
// DNS: which destination IPs belong to which mesh service (Consul virtual IPs,
// the `virtual` tagged address, and instance addresses of DialedDirectly
// services), whether non-mesh destinations are allowed (mesh config entry
// MeshDestinationsOnly), and which healthy instances of a service to dial.
//
// Scale shapes the design. The map side uses a constant number of blocking
// queries however large the catalog is: one on /v1/catalog/services (whose
// index moves only when service registrations change, not on health-check
// flaps) that triggers a bulk read of every node's services (GET
// /v1/internal/ui/nodes: the only HTTP read returning tagged addresses and
// proxy config of all instances at once; internal to Consul, so the
// real-agent tests pin it), plus one each for
// service-defaults, proxy-defaults and mesh config entries. One watch per
// service would not work at catalog scale: the agent allows 200 concurrent
// HTTP connections per client IP by default (limits.http_max_conns_per_client).
// The instance side (passing connect instances used for load balancing) is
// watched lazily, one blocking Health().Connect per service in use, stopped
// when idle, and capped.
package catalog
