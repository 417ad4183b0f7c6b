package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// socketPair is one address's UDP and TCP sockets.
type socketPair struct {
	pc net.PacketConn
	ln net.Listener
}

func (sp socketPair) close() {
	sp.pc.Close()
	sp.ln.Close()
}

// listenDualStack binds addr (UDP and TCP) and, when addr is a loopback
// address of one family, the other family's loopback at the same port. The
// redirect rules DNAT each family's port-53 queries to its own loopback
// (127.0.0.1:PORT, [::1]:PORT), so in a dual-stack pod a resolver asking
// ::1 must find ferry there too. A namespace without IPv6 (no ::1) has no
// IPv6 rules: the companion is skipped. Any other failure is an error.
func listenDualStack(addr string) ([]socketPair, error) {
	for attempt := 0; ; attempt++ {
		pc, ln, err := listenBoth(addr)
		if err != nil {
			return nil, err
		}
		first := socketPair{pc, ln}
		other, ok := companionLoopback(pc.LocalAddr())
		if !ok {
			return []socketPair{first}, nil
		}
		pc2, ln2, err := listenBoth(other)
		switch {
		case err == nil:
			return []socketPair{first, {pc2, ln2}}, nil
		case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT):
			return []socketPair{first}, nil
		case errors.Is(err, syscall.EADDRINUSE) && portZero(addr) && attempt < 8:
			first.close()
			continue
		default:
			first.close()
			return nil, fmt.Errorf("dual-stack companion %s: %w", other, err)
		}
	}
}

// companionLoopback returns the other family's loopback at a's port.
func companionLoopback(a net.Addr) (string, bool) {
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		return "", false
	}
	ap := ua.AddrPort()
	var other netip.Addr
	switch ip := ap.Addr(); {
	case ip.Unmap() == netip.AddrFrom4([4]byte{127, 0, 0, 1}):
		other = netip.IPv6Loopback()
	case ip == netip.IPv6Loopback():
		other = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	default:
		return "", false
	}
	return netip.AddrPortFrom(other, ap.Port()).String(), true
}

func portZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}
