package listener

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h.
// x/sys/unix does not export it; the value (80) is fixed kernel ABI.
const ip6tSOOriginalDst = 80

// ErrNoOriginalDst means the kernel has no NAT record for the connection:
// it reached the listener directly instead of through a REDIRECT rule.
var ErrNoOriginalDst = errors.New("no original destination (connection was not redirected)")

// OriginalDst returns the destination a connection had before an iptables
// REDIRECT/DNAT rule sent it to this listener (getsockopt SO_ORIGINAL_DST for
// IPv4, IP6T_SO_ORIGINAL_DST for IPv6). For a connection that was not
// translated the kernel reports either ENOENT (ErrNoOriginalDst) or the
// connection's own local address; callers that must refuse loops compare the
// result with c.LocalAddr().
//
// It uses the raw connection's Control, so the descriptor is neither
// duplicated nor switched to blocking mode.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	if c == nil {
		return netip.AddrPort{}, errors.New("original dst: nil connection")
	}
	la, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok || la == nil {
		return netip.AddrPort{}, errors.New("original dst: connection has no local TCP address")
	}
	// The conntrack entry's family follows the packet, not the socket: an
	// IPv4 connection accepted on a dual-stack socket is asked with SOL_IP.
	v6 := la.IP.To4() == nil

	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	var (
		dst    netip.AddrPort
		optErr error
	)
	ctlErr := rc.Control(func(fd uintptr) {
		if v6 {
			dst, optErr = origDst6(int(fd))
		} else {
			dst, optErr = origDst4(int(fd))
		}
	})
	if ctlErr != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", ctlErr)
	}
	if optErr != nil {
		if errors.Is(optErr, syscall.ENOENT) {
			return netip.AddrPort{}, ErrNoOriginalDst
		}
		return netip.AddrPort{}, fmt.Errorf("original dst: getsockopt: %w", optErr)
	}
	return dst, nil
}

// origDst4 reads a struct sockaddr_in. IPv6Mreq is merely a 20-byte buffer
// of the right shape (the kernel needs >= 16 bytes), which avoids unsafe.
func origDst4(fd int) (netip.AddrPort, error) {
	m, err := unix.GetsockoptIPv6Mreq(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return parseSockaddrIn(m.Multiaddr[:])
}

// origDst6 reads a struct sockaddr_in6 through the IPv6MTUInfo buffer whose
// first member is exactly a RawSockaddrInet6.
func origDst6(fd int) (netip.AddrPort, error) {
	m, err := unix.GetsockoptIPv6MTUInfo(fd, unix.SOL_IPV6, ip6tSOOriginalDst)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if m.Addr.Family != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("unexpected address family %d", m.Addr.Family)
	}
	// Port holds network-order bytes read as a native integer.
	var pb [2]byte
	binary.NativeEndian.PutUint16(pb[:], m.Addr.Port)
	addr := netip.AddrFrom16(m.Addr.Addr)
	if m.Addr.Scope_id != 0 {
		addr = addr.WithZone(fmt.Sprint(m.Addr.Scope_id))
	}
	return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(pb[:])), nil
}

// parseSockaddrIn decodes the raw bytes of a struct sockaddr_in: family
// (host order), port (network order), address.
func parseSockaddrIn(b []byte) (netip.AddrPort, error) {
	if len(b) < 8 {
		return netip.AddrPort{}, fmt.Errorf("short sockaddr_in (%d bytes)", len(b))
	}
	fam := binary.NativeEndian.Uint16(b[0:2])
	if fam != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("unexpected address family %d", fam)
	}
	port := binary.BigEndian.Uint16(b[2:4])
	addr := netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]})
	return netip.AddrPortFrom(addr, port), nil
}
