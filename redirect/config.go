package redirect

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultOutboundPort is Consul's default transparent-proxy outbound
// listener port (sdk/iptables DefaultTProxyOutboundPort).
const DefaultOutboundPort = 15001

// Item is one input value together with where it came from, so that an
// error can name the flag, annotation or JSON field the operator has to fix.
type Item struct {
	Value  string
	Source string // e.g. "-exclude-inbound-port", "annotation consul.hashicorp.com/transparent-proxy-exclude-uids"
}

// Config is the operator's intent as loose text, the same shape as Consul's
// sdk/iptables Config. Build validates all of it at once into a Spec.
type Config struct {
	ProxyUserID       Item // required
	ProxyInboundPort  Item // required, 1-65535
	ProxyOutboundPort Item // empty or "0" means DefaultOutboundPort
	ConsulDNSIP       Item // empty: no IP-only DNS mode (port mode defaults to loopback)
	ConsulDNSPort     Item // empty or "0": IP-only mode (if ConsulDNSIP is set)

	ExcludeInboundPorts  []Item
	ExcludeOutboundPorts []Item
	ExcludeOutboundCIDRs []Item
	ExcludeUIDs          []Item
}

// Spec is a validated Config: every value is in the canonical form
// iptables-save prints, so plans compare equal to what the kernel reports.
type Spec struct {
	ProxyUID     string
	InboundPort  int
	OutboundPort int
	DNSIP        netip.Addr // invalid when unset
	DNSPort      int

	ExcludeInboundPorts  []string
	ExcludeOutboundPorts []string
	ExcludeOutboundCIDRs []netip.Prefix
	ExcludeUIDs          []string
}

// ValueError reports one bad input value and where it came from.
type ValueError struct {
	Item   Item
	Reason string
}

func (e *ValueError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s", e.Item.Source, e.Item.Value, e.Reason)
}

// Validate checks every value of c and returns the canonical Spec. All bad
// values are reported together (errors.Join of *ValueError), so an operator
// fixes a manifest in one round trip.
func (c Config) Validate() (Spec, error) {
	var s Spec
	var errs []error
	bad := func(it Item, format string, args ...any) {
		errs = append(errs, &ValueError{Item: it, Reason: fmt.Sprintf(format, args...)})
	}

	if strings.TrimSpace(c.ProxyUserID.Value) == "" {
		bad(c.ProxyUserID, "a proxy UID is required")
	} else if uid, err := canonicalUID(c.ProxyUserID.Value); err != nil {
		bad(c.ProxyUserID, "%v", err)
	} else if strings.Contains(uid, "-") {
		// iptables would take a range, and "0-4294967294" would exempt
		// every process from redirection. The proxy is one user; extra
		// exempt users (and ranges) belong in the exclude-UID list.
		bad(c.ProxyUserID, "the proxy UID must be a single user ID, not a range (use -exclude-uid for more users)")
	} else {
		s.ProxyUID = uid
	}

	if p, err := optionalPort(c.ProxyInboundPort.Value); err != nil {
		bad(c.ProxyInboundPort, "%v", err)
	} else if p == 0 {
		bad(c.ProxyInboundPort, "a proxy inbound port is required")
	} else {
		s.InboundPort = p
	}

	if p, err := optionalPort(c.ProxyOutboundPort.Value); err != nil {
		bad(c.ProxyOutboundPort, "%v", err)
	} else if p == 0 {
		s.OutboundPort = DefaultOutboundPort
	} else {
		s.OutboundPort = p
	}

	if v := strings.TrimSpace(c.ConsulDNSIP.Value); v != "" {
		if ip, err := dnsIP(v); err != nil {
			bad(c.ConsulDNSIP, "%v", err)
		} else {
			s.DNSIP = ip
		}
	}
	if p, err := optionalPort(c.ConsulDNSPort.Value); err != nil {
		bad(c.ConsulDNSPort, "%v", err)
	} else {
		s.DNSPort = p
	}

	for _, it := range c.ExcludeInboundPorts {
		if p, err := canonicalPortSpec(it.Value); err != nil {
			bad(it, "%v", err)
		} else {
			s.ExcludeInboundPorts = append(s.ExcludeInboundPorts, p)
		}
	}
	for _, it := range c.ExcludeOutboundPorts {
		if p, err := canonicalPortSpec(it.Value); err != nil {
			bad(it, "%v", err)
		} else {
			s.ExcludeOutboundPorts = append(s.ExcludeOutboundPorts, p)
		}
	}
	for _, it := range c.ExcludeOutboundCIDRs {
		if p, err := canonicalCIDR(it.Value); err != nil {
			bad(it, "%v", err)
		} else {
			s.ExcludeOutboundCIDRs = append(s.ExcludeOutboundCIDRs, p)
		}
	}
	for _, it := range c.ExcludeUIDs {
		if u, err := canonicalUID(it.Value); err != nil {
			bad(it, "%v", err)
		} else {
			s.ExcludeUIDs = append(s.ExcludeUIDs, u)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Spec{}, err
	}
	return s, nil
}

// decimal parses a plain decimal number. Leading zeros are refused because
// iptables reads numbers with base 0: "0443" would silently become port 291.
func decimal(s string, max uint64) (uint64, error) {
	if s == "" {
		return 0, errors.New("empty value")
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, fmt.Errorf("%q is not a decimal number", s)
		}
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("%q has a leading zero (iptables would read it as octal)", s)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > max {
		return 0, fmt.Errorf("%s is out of range (max %d)", s, max)
	}
	return n, nil
}

// optionalPort parses a listener port: empty or "0" means unset.
func optionalPort(v string) (int, error) {
	v = strings.TrimSpace(v)
	if v == "" || v == "0" {
		return 0, nil
	}
	n, err := decimal(v, 65535)
	if err != nil {
		return 0, fmt.Errorf("not a port number (1-65535): %w", err)
	}
	return int(n), nil
}

// canonicalPortSpec accepts what Consul documents for exclusions (a port, a
// range "lo:hi", or a service name) and returns the form iptables-save
// prints. Service names are resolved here, from /etc/services, so the plan
// can be compared with the kernel's state.
func canonicalPortSpec(v string) (string, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return "", errors.New("empty port")
	}
	if lo, hi, ok := strings.Cut(v, ":"); ok {
		a, err := oneTCPPort(lo)
		if err != nil {
			return "", fmt.Errorf("bad port range: %w", err)
		}
		b, err := oneTCPPort(hi)
		if err != nil {
			return "", fmt.Errorf("bad port range: %w", err)
		}
		if a > b {
			return "", fmt.Errorf("port range %d:%d is reversed", a, b)
		}
		if a == b {
			return strconv.Itoa(a), nil
		}
		return fmt.Sprintf("%d:%d", a, b), nil
	}
	p, err := oneTCPPort(v)
	if err != nil {
		return "", err
	}
	return strconv.Itoa(p), nil
}

func oneTCPPort(v string) (int, error) {
	if v == "" {
		return 0, errors.New("empty port")
	}
	if v[0] >= '0' && v[0] <= '9' {
		n, err := decimal(v, 65535)
		if err != nil {
			return 0, fmt.Errorf("not a port (1-65535): %w", err)
		}
		if n == 0 {
			return 0, errors.New("port 0 is not a port")
		}
		return int(n), nil
	}
	if !isServiceName(v) {
		return 0, fmt.Errorf("%q is neither a port number nor a service name", v)
	}
	p, err := net.LookupPort("tcp", v)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("unknown service name %q", v)
	}
	return p, nil
}

func isServiceName(v string) bool {
	if len(v) > 64 {
		return false
	}
	for i, r := range v {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case i > 0 && (r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.'):
		default:
			return false
		}
	}
	return true
}

// canonicalCIDR accepts an address or a prefix. iptables would also take a
// host name and resolve it at insert time; that is refused here because the
// answer would be frozen into the rules.
func canonicalCIDR(v string) (netip.Prefix, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return netip.Prefix{}, errors.New("empty CIDR")
	}
	var p netip.Prefix
	if strings.Contains(v, "/") {
		var err error
		p, err = netip.ParsePrefix(v)
		if err != nil {
			return netip.Prefix{}, errors.New("not an IP address or CIDR")
		}
	} else {
		a, err := netip.ParseAddr(v)
		if err != nil {
			return netip.Prefix{}, errors.New("not an IP address or CIDR")
		}
		if a.Zone() != "" {
			return netip.Prefix{}, errors.New("zoned addresses are not allowed")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	return p.Masked(), nil
}

// canonicalUID accepts a numeric UID or a range "lo-hi", as the owner match
// does. User names are refused: they would be resolved against whatever
// /etc/passwd the init container happens to have.
func canonicalUID(v string) (string, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return "", errors.New("empty UID")
	}
	const maxUID = 1<<32 - 2 // (uid_t)-1 means "no UID"
	if lo, hi, ok := strings.Cut(v, "-"); ok {
		a, err := decimal(lo, maxUID)
		if err != nil {
			return "", fmt.Errorf("bad UID range: %w", err)
		}
		b, err := decimal(hi, maxUID)
		if err != nil {
			return "", fmt.Errorf("bad UID range: %w", err)
		}
		if a > b {
			return "", fmt.Errorf("UID range %d-%d is reversed", a, b)
		}
		if a == b {
			return strconv.FormatUint(a, 10), nil
		}
		return fmt.Sprintf("%d-%d", a, b), nil
	}
	n, err := decimal(v, maxUID)
	if err != nil {
		return "", fmt.Errorf("not a numeric UID: %w", err)
	}
	return strconv.FormatUint(n, 10), nil
}

func dnsIP(v string) (netip.Addr, error) {
	a, err := netip.ParseAddr(v)
	if err != nil {
		return netip.Addr{}, errors.New("not an IP address")
	}
	if a.Zone() != "" {
		return netip.Addr{}, errors.New("zoned addresses are not allowed")
	}
	if a.IsUnspecified() || a.IsMulticast() {
		return netip.Addr{}, errors.New("not a unicast address")
	}
	if a.Is4In6() {
		return netip.Addr{}, errors.New("IPv4-mapped IPv6 addresses are ambiguous; write the IPv4 address")
	}
	return a, nil
}
