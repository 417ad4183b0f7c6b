package dns

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	mdns "github.com/miekg/dns"
)

// MeshView is the part of the mesh the DNS server needs. proxy/catalog
// satisfies it.
type MeshView interface {
	// VirtualIP returns the virtual IP of the mesh service named service
	// (the "virtual" tagged address when present, else "consul-virtual"),
	// and false when service is not a mesh service or has no VIP yet.
	// service is always lower case: DNS names are case-insensitive, and
	// implementations should match Consul service names case-insensitively.
	VirtualIP(service string) (netip.Addr, bool)
}

// datacenterView is optionally implemented by a MeshView (proxy/catalog
// does): when Config.Datacenter is empty, the server asks it for the local
// datacenter at each query, so a view that learns it after start works.
type datacenterView interface {
	Datacenter() string // "" while unknown
}

// Config configures a Server. The zero value of every field except Mesh has
// a usable default (see the field comments).
type Config struct {
	// Addr is the UDP and TCP listen address. Default 127.0.0.1:8600. A port
	// of 0 picks a free port, the same one for UDP and TCP. A loopback
	// address also binds the other family's loopback at the same port
	// (skipped where the namespace has no IPv6).
	Addr string
	// ClusterDomain is the Kubernetes cluster domain; <svc>.<ns>.svc.<domain>
	// names of mesh services resolve to their VIP. Default cluster.local.
	ClusterDomain string
	// ConsulDomain is Consul's DNS domain. Default consul.
	ConsulDomain string
	// Datacenter is the local Consul datacenter: <svc>.service.<dc>.consul
	// names are answered locally only for it. Empty: the Mesh view's
	// Datacenter() if it has that method, else only the forms without a
	// datacenter are answered locally.
	Datacenter string
	// Recursors receive every name that is not answered locally (host:port;
	// a bare IP means port 53). Tried in order, failing over on errors and
	// timeouts. See RecursorsFromResolvConf.
	Recursors []string
	// ConsulDNS is the Consul agent's DNS address (e.g. 127.0.0.1:8600 on a
	// node agent). Record types other than A/AAAA for .consul names, and
	// .consul names that are not mesh services, go there. Empty: such names
	// go to the Recursors, or get NXDOMAIN when there are none.
	ConsulDNS string
	// ConsulDNSMore are further Consul DNS addresses, tried in order after
	// ConsulDNS (agentless: every server's DNS).
	ConsulDNSMore []string
	// Mesh is the mesh view. Required.
	Mesh MeshView
	// Logger; default a null logger.
	Logger hclog.Logger

	// MeshTTL is the TTL of answers for mesh names. Short so that a changed
	// VIP is picked up quickly. Default 5s.
	MeshTTL time.Duration
	// NegativeTTL is the SOA minimum of negative answers made locally
	// (NXDOMAIN, and NODATA for AAAA of an IPv4 VIP). Default 5s.
	NegativeTTL time.Duration
	// CacheSize bounds the number of cached forwarded answers. Default 4096;
	// negative disables the cache.
	CacheSize int
	// CacheMaxTTL caps how long a forwarded positive answer is cached
	// (it is never cached longer than its own TTL). Default 5m.
	CacheMaxTTL time.Duration
	// CacheNegativeTTL caps how long a forwarded negative answer is cached
	// (it is never cached longer than its SOA minimum). Default 30s.
	CacheNegativeTTL time.Duration
	// UpstreamTimeout bounds one exchange with one upstream. Default 2s.
	UpstreamTimeout time.Duration
	// QueryTimeout bounds the whole handling of one forwarded query,
	// failover included; the client then gets SERVFAIL. Default 5s.
	QueryTimeout time.Duration
	// MaxInflight bounds concurrently forwarded queries; beyond it clients
	// get SERVFAIL at once. Local answers are never limited. Default 512.
	MaxInflight int
	// TCPIdleTimeout closes idle client TCP connections. Default 8s.
	TCPIdleTimeout time.Duration
}

// Default values, exported for flag help texts.
const (
	DefaultAddr          = "127.0.0.1:8600"
	DefaultClusterDomain = "cluster.local"
	DefaultConsulDomain  = "consul"
)

// upstreamUDPSize is the EDNS0 buffer size advertised upstream and to
// clients: the DNS flag day 2020 value, which avoids IP fragmentation.
const upstreamUDPSize = 1232

func (c Config) withDefaults() (Config, error) {
	if c.Mesh == nil {
		return c, errors.New("dns: config: Mesh is required")
	}
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = DefaultClusterDomain
	}
	if c.ConsulDomain == "" {
		c.ConsulDomain = DefaultConsulDomain
	}
	c.ClusterDomain = mdns.CanonicalName(c.ClusterDomain)
	c.ConsulDomain = mdns.CanonicalName(c.ConsulDomain)
	for _, d := range []string{c.ClusterDomain, c.ConsulDomain} {
		if _, ok := mdns.IsDomainName(d); !ok || d == "." {
			return c, fmt.Errorf("dns: config: invalid domain %q", d)
		}
	}
	c.Datacenter = strings.ToLower(c.Datacenter)
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.MeshTTL, 5*time.Second)
	def(&c.NegativeTTL, 5*time.Second)
	def(&c.CacheMaxTTL, 5*time.Minute)
	def(&c.CacheNegativeTTL, 30*time.Second)
	def(&c.UpstreamTimeout, 2*time.Second)
	def(&c.QueryTimeout, 5*time.Second)
	def(&c.TCPIdleTimeout, 8*time.Second)
	if c.CacheSize == 0 {
		c.CacheSize = 4096
	}
	if c.MaxInflight <= 0 {
		c.MaxInflight = 512
	}
	var err error
	if c.Recursors, err = normalizeAddrs(c.Recursors); err != nil {
		return c, fmt.Errorf("dns: config: recursor: %w", err)
	}
	if c.ConsulDNS != "" {
		a, err := normalizeAddrs([]string{c.ConsulDNS})
		if err != nil {
			return c, fmt.Errorf("dns: config: consul dns: %w", err)
		}
		c.ConsulDNS = a[0]
	}
	if c.ConsulDNSMore, err = normalizeAddrs(c.ConsulDNSMore); err != nil {
		return c, fmt.Errorf("dns: config: consul dns: %w", err)
	}
	return c, nil
}

// normalizeAddrs turns "ip" and "ip:port" into "ip:port" (port 53 default).
func normalizeAddrs(in []string) ([]string, error) {
	out := make([]string, 0, len(in))
	for _, a := range in {
		if ip, err := netip.ParseAddr(a); err == nil {
			out = append(out, netip.AddrPortFrom(ip, 53).String())
			continue
		}
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return nil, fmt.Errorf("%q: want IP or IP:port", a)
		}
		out = append(out, ap.String())
	}
	return out, nil
}

// RecursorsFromResolvConf returns the nameservers of a resolv.conf file
// (e.g. the pod's /etc/resolv.conf, read at start) as IP:53, leaving out
// those that would reach ferry itself. self is ferry's own DNS address (an
// IP or IP:port; only the IP counts). A nameserver equal to it is left out.
// When self is a loopback or unspecified IP, every loopback nameserver is
// left out too: in a redirected pod resolv.conf names 127.0.0.1 (::1) and
// the DNS rules DNAT its port 53 to ferry, so forwarding there would loop
// back to ferry (whatever port ferry listens on, and a wildcard listener
// receives the DNATed loopback queries as well). IPv6 zones are kept.
func RecursorsFromResolvConf(path, self string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dns: resolv.conf: %w", err)
	}
	defer f.Close()
	var skip netip.Addr
	if self != "" {
		if h, _, err := net.SplitHostPort(self); err == nil {
			self = h
		}
		skip, _ = netip.ParseAddr(self)
		skip = skip.Unmap()
	}
	skipLoopback := skip.IsValid() && (skip.IsLoopback() || skip.IsUnspecified())
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		ip, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue // glibc ignores bad entries too
		}
		if u := ip.Unmap(); (skip.IsValid() && u.WithZone("") == skip.WithZone("")) || (skipLoopback && u.IsLoopback()) {
			continue
		}
		out = append(out, netip.AddrPortFrom(ip, 53).String())
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("dns: resolv.conf %s: %w", path, err)
	}
	return out, nil
}
