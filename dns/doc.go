// Package dns is the sidecar's DNS server: names of mesh services resolve to
// their virtual IPs, which the outbound listener routes through the mesh;
// every other name is forwarded to the pod's recursors.
//
// In a redirected pod, queries to 127.0.0.1:53 are DNATed to the server
// (default 127.0.0.1:8600; `ferry redirect -consul-dns-ip 127.0.0.1
// -consul-dns-port 8600`). It answers, over UDP and TCP:
//
//   - A/AAAA of <svc>.<ns>.svc.<cluster domain>, <svc>.virtual.consul,
//     <svc>.service.consul and <svc>.service.<dc>[.dc].consul with the VIP
//     of mesh service <svc> (MeshView: the `virtual` tagged address, else
//     `consul-virtual`), TTL Config.MeshTTL. AAAA of an IPv4 VIP is NODATA.
//     Consul OSS has one namespace, and consul-k8s without namespaces
//     registers the services of every Kubernetes namespace in it, so <ns>
//     is not used: backend.any-ns.svc.cluster.local is Consul's "backend".
//   - Other names under the cluster domain go to the recursors (Kubernetes
//     knows its non-mesh services); other names and record types under the
//     Consul domain go to the agent's DNS (Config.ConsulDNS), else to the
//     recursors. Where nobody can be asked, or for <svc>.virtual.consul of
//     a service that is not in the mesh, the answer is NXDOMAIN with a SOA
//     (negative TTL Config.NegativeTTL).
//   - Everything else goes to the recursors: EDNS0 (1232-byte buffer, DO
//     bit kept), a retry over TCP when the UDP answer is truncated, per
//     upstream and per query timeouts, failover in order (starting from the
//     last upstream that answered), identical concurrent questions sharing
//     one exchange, and a cache bounded in entries and bytes that honours
//     TTLs and caches negative answers for their SOA minimum (RFC 2308),
//     both capped.
//
// Bad input never crashes or stalls the server: each packet has its own
// goroutine; malformed packets are dropped or get FORMERR; responses are
// never answered; ANY, zone transfers, non-IN classes and opcodes other than
// QUERY get NOTIMP; EDNS versions other than 0 get BADVERS; forwarding is
// bounded by Config.MaxInflight (SERVFAIL beyond it, local answers are never
// limited). Forwarded queries carry an EDNS0 option with a per-server nonce:
// a query that comes back with our nonce (e.g. legacy rules that DNAT all
// port-53 traffic, the proxy's own included) or through 8 such servers is
// answered SERVFAIL instead of being forwarded again.
//
// Imports: nothing of ferry's. It reads the mesh view through its own
// interface, which cmd/ferry fills with proxy/catalog's view; it never
// imports proxy or catalog (internal/archtest checks it).
package dns
