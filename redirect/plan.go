package redirect

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Table is the only table the rules touch; like Consul, ferry uses nat
// REDIRECT/DNAT only (no mangle, no TPROXY).
const Table = "nat"

// The five chains, named as Consul names them so that ferry and Consul
// recognise (and clean up) each other's rules.
const (
	ChainInbound         = "CONSUL_PROXY_INBOUND"
	ChainInboundRedirect = "CONSUL_PROXY_IN_REDIRECT"
	ChainOutput          = "CONSUL_PROXY_OUTPUT"
	ChainOutputRedirect  = "CONSUL_PROXY_REDIRECT"
	ChainDNS             = "CONSUL_DNS_REDIRECT"
)

// Chains returns the five owned chains in the order sdk/iptables creates them.
func Chains() []string {
	return []string{ChainInbound, ChainInboundRedirect, ChainOutput, ChainOutputRedirect, ChainDNS}
}

// IsOwnedChain reports whether name is one of the five chains.
func IsOwnedChain(name string) bool {
	switch name {
	case ChainInbound, ChainInboundRedirect, ChainOutput, ChainOutputRedirect, ChainDNS:
		return true
	}
	return false
}

// Family is an address family; each has its own nat table.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// Command is the iptables binary for the family.
func (f Family) Command() string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

func (f Family) loopback() netip.Addr {
	if f == IPv6 {
		return netip.IPv6Loopback()
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

func (f Family) has(a netip.Addr) bool { return (f == IPv6) == (a.Is6() && !a.Is4In6()) }

// Rule is one rule of the nat table. Spec is written exactly as
// `iptables -S` / iptables-save prints it, so a plan can be compared with
// the kernel's state by string equality.
type Rule struct {
	Chain string
	Spec  string
}

func (r Rule) String() string { return "-A " + r.Chain + " " + r.Spec }

// StepKind is the iptables command a Step stands for.
type StepKind int

const (
	NewChain StepKind = iota // -N
	Append                   // -A
	Insert                   // -I (position 1)
)

// Step is one command of the sdk/iptables command list. A Plan keeps the
// list in Consul's order, so tests can check it rule for rule; the kernel
// gets the resulting state in one transaction instead.
type Step struct {
	Kind StepKind
	Rule Rule // only Rule.Chain for NewChain
}

func (s Step) String() string {
	switch s.Kind {
	case NewChain:
		return "-N " + s.Rule.Chain
	case Insert:
		return "-I " + s.Rule.Chain + " " + s.Rule.Spec
	default:
		return s.Rule.String()
	}
}

// Plan is the rule set for one family's nat table.
type Plan struct {
	Family Family
	Steps  []Step
}

// Build turns a validated Spec into one Plan per family. IPv4 CIDRs go only
// to the IPv4 plan and IPv6 CIDRs only to the IPv6 one (Consul applies one
// list to both and fails half-way on a mixed list). DNS rules go to the
// family of -consul-dns-ip; in port mode without an IP, every family gets
// them for its own loopback address.
func Build(s Spec, families ...Family) ([]Plan, error) {
	if len(families) == 0 {
		families = []Family{IPv4}
	}
	if s.DNSIP.IsValid() {
		found := false
		for _, f := range families {
			found = found || f.has(s.DNSIP)
		}
		if !found {
			return nil, fmt.Errorf("consul DNS IP %s is %s, but only %s rules are being installed (use -ipv6 for IPv6)",
				s.DNSIP, familyOf(s.DNSIP), familyList(families))
		}
	}
	plans := make([]Plan, 0, len(families))
	seen := map[Family]bool{}
	for _, f := range families {
		if seen[f] {
			continue
		}
		seen[f] = true
		plans = append(plans, buildFamily(s, f))
	}
	return plans, nil
}

func familyOf(a netip.Addr) Family {
	if a.Is6() && !a.Is4In6() {
		return IPv6
	}
	return IPv4
}

func familyList(fs []Family) string {
	var names []string
	for _, f := range fs {
		names = append(names, f.String())
	}
	return strings.Join(names, "+")
}

func hostPrefix(a netip.Addr) string { return netip.PrefixFrom(a, a.BitLen()).String() }

// buildFamily follows sdk/iptables Setup command by command (see
// shared/reference/redirect.md §1.5); only the spelling of each rule is the
// canonical iptables-save one.
func buildFamily(s Spec, f Family) Plan {
	p := Plan{Family: f}
	add := func(k StepKind, chain, spec string) {
		p.Steps = append(p.Steps, Step{Kind: k, Rule: Rule{Chain: chain, Spec: spec}})
	}
	for _, c := range Chains() {
		add(NewChain, c, "")
	}

	add(Append, ChainOutputRedirect, "-p tcp -j REDIRECT --to-ports "+strconv.Itoa(s.OutboundPort))

	switch {
	case s.DNSIP.IsValid() && s.DNSPort == 0 && f.has(s.DNSIP):
		// IP-only mode: every port-53 packet goes to the DNS IP.
		to := s.DNSIP.String()
		add(Append, ChainDNS, "-p udp -m udp --dport 53 -j DNAT --to-destination "+to)
		add(Append, ChainDNS, "-p tcp -m tcp --dport 53 -j DNAT --to-destination "+to)
		add(Append, "OUTPUT", "-p udp -m udp --dport 53 -j "+ChainDNS)
		add(Append, "OUTPUT", "-p tcp -m tcp --dport 53 -j "+ChainDNS)
	case s.DNSPort != 0 && (!s.DNSIP.IsValid() || f.has(s.DNSIP)):
		ip := f.loopback()
		if s.DNSIP.IsValid() {
			ip = s.DNSIP
		}
		d := hostPrefix(ip)
		to := netip.AddrPortFrom(ip, uint16(s.DNSPort)).String()
		add(Append, ChainDNS, "-d "+d+" -p udp -m udp --dport 53 -j DNAT --to-destination "+to)
		add(Append, ChainDNS, "-d "+d+" -p tcp -m tcp --dport 53 -j DNAT --to-destination "+to)
		add(Append, "OUTPUT", "-d "+d+" -p udp -m udp --dport 53 -j "+ChainDNS)
		add(Append, "OUTPUT", "-d "+d+" -p tcp -m tcp --dport 53 -j "+ChainDNS)
	}

	add(Append, "OUTPUT", "-p tcp -j "+ChainOutput)
	add(Append, ChainOutput, "-m owner --uid-owner "+s.ProxyUID+" -j RETURN")
	add(Append, ChainOutput, "-d "+hostPrefix(f.loopback())+" -j RETURN")
	add(Append, ChainOutput, "-j "+ChainOutputRedirect)
	for _, port := range s.ExcludeOutboundPorts {
		add(Insert, ChainOutput, "-p tcp -m tcp --dport "+port+" -j RETURN")
	}
	for _, cidr := range s.ExcludeOutboundCIDRs {
		if f.has(cidr.Addr()) {
			add(Insert, ChainOutput, "-d "+cidr.String()+" -j RETURN")
		}
	}
	for _, uid := range s.ExcludeUIDs {
		add(Insert, ChainOutput, "-m owner --uid-owner "+uid+" -j RETURN")
	}

	add(Append, ChainInboundRedirect, "-p tcp -j REDIRECT --to-ports "+strconv.Itoa(s.InboundPort))
	add(Append, "PREROUTING", "-p tcp -j "+ChainInbound)
	add(Append, ChainInbound, "-p tcp -j "+ChainInboundRedirect)
	for _, port := range s.ExcludeInboundPorts {
		add(Insert, ChainInbound, "-p tcp -m tcp --dport "+port+" -j RETURN")
	}
	return p
}

// Chains returns the chains the plan creates, in creation order.
func (p Plan) Chains() []string {
	var cs []string
	for _, s := range p.Steps {
		if s.Kind == NewChain {
			cs = append(cs, s.Rule.Chain)
		}
	}
	return cs
}

// Rules replays the steps and returns the final rules per chain, each
// chain's rules in kernel order. Built-in chains hold only the plan's jumps.
func (p Plan) Rules() map[string][]string {
	out := map[string][]string{}
	for _, s := range p.Steps {
		switch s.Kind {
		case Append:
			out[s.Rule.Chain] = append(out[s.Rule.Chain], s.Rule.Spec)
		case Insert:
			out[s.Rule.Chain] = append([]string{s.Rule.Spec}, out[s.Rule.Chain]...)
		}
	}
	return out
}

// chainOrder lists every chain the plan touches: built-ins first (in the
// kernel's order), then the owned chains in creation order.
func (p Plan) chainOrder() []string {
	order := []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}
	return append(order, p.Chains()...)
}

// Restore renders the plan in iptables-restore format: the state the table
// ends up in, as `iptables-restore --noflush` would take it on a table that
// holds none of ferry's rules.
func (p Plan) Restore() string {
	t := newRestoreTx(p.Chains())
	t.rules("-A", p.chainOrder(), p.Rules())
	return t.commit()
}
