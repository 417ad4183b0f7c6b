// Package dns is the sidecar's DNS server: names of mesh services resolve to
// their virtual IPs, which the outbound listener routes through the mesh;
// every other name is forwarded to the pod's recursors.
package dns
