package listener

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
)

// LoopbackPair binds addr with listen and, when addr is a loopback address
// of one family (127.0.0.1 or ::1), the other family's loopback at the same
// port: the redirect rules send each family to its own loopback (REDIRECT
// and the DNS DNAT alike), so in a dual-stack pod an IPv6 connection or
// query must find ferry on [::1] at the port its IPv4 twin finds on
// 127.0.0.1.
//
// A namespace without IPv6 (disable_ipv6, no ::1) has no IPv6 rules either:
// there the companion is skipped. Any other failure to bind it is an error,
// because the rules would then send that family nowhere. With port 0 the
// pair is retried on a fresh port when the companion's port is taken.
//
// listen returns what it bound and the address it is bound to; closeFn
// closes one of those. The result holds one or two of them, addr's first.
func LoopbackPair[T any](addr string, listen func(addr string) (T, net.Addr, error), closeFn func(T)) ([]T, error) {
	for attempt := 0; ; attempt++ {
		first, bound, err := listen(addr)
		if err != nil {
			return nil, err
		}
		other, ok := companionLoopback(bound)
		if !ok {
			return []T{first}, nil
		}
		second, _, err := listen(other)
		switch {
		case err == nil:
			return []T{first, second}, nil
		case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT):
			return []T{first}, nil
		case errors.Is(err, syscall.EADDRINUSE) && requestsPortZero(addr) && attempt < 8:
			closeFn(first)
			continue
		default:
			closeFn(first)
			return nil, fmt.Errorf("dual-stack companion %s of %s: %w", other, bound, err)
		}
	}
}

// companionLoopback returns the other family's loopback at a's port.
func companionLoopback(a net.Addr) (string, bool) {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		return "", false
	}
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

func requestsPortZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	n, err := strconv.Atoi(port)
	return err == nil && n == 0
}
