package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"

	"github.com/ferrymesh/ferry/listener"
)

// listenLoopbackPair binds addr and, when addr is a loopback address of one
// family (127.0.0.1 or ::1), the other family's loopback at the same port,
// merged into one acceptor. The redirect rules' REDIRECT target is the
// loopback of the packet's family: an app's IPv6 connection arrives on
// [::1]:port, its IPv4 one on 127.0.0.1:port, so a dual-stack pod needs
// both (Consul's Envoy binds 127.0.0.1 only, which refuses IPv6).
//
// A namespace without IPv6 (disable_ipv6, no ::1) has no IPv6 redirect rules
// either: there the companion is skipped. Any other failure to bind it is an
// error, because the rules would then send IPv6 connections nowhere. With
// port 0 the pair is retried on a fresh port if the companion port is taken.
func listenLoopbackPair(ctx context.Context, listen func(context.Context, string) (listener.TCPAcceptor, error), addr string) (listener.TCPAcceptor, error) {
	for attempt := 0; ; attempt++ {
		first, err := listen(ctx, addr)
		if err != nil {
			return nil, err
		}
		other, ok := companionLoopback(first.Addr())
		if !ok {
			return first, nil
		}
		second, err := listen(ctx, other)
		switch {
		case err == nil:
			return listener.Merge(first, second), nil
		case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT):
			return first, nil
		case errors.Is(err, syscall.EADDRINUSE) && requestsPortZero(addr) && attempt < 8:
			first.Close()
			continue
		default:
			first.Close()
			return nil, fmt.Errorf("dual-stack companion %s of %s: %w", other, first.Addr(), err)
		}
	}
}

// companionLoopback returns the other family's loopback at a's port.
func companionLoopback(a net.Addr) (string, bool) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return "", false
	}
	ap := ta.AddrPort()
	ip := ap.Addr()
	var other netip.Addr
	switch {
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
