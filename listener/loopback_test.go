package listener

import (
	"net"
	"testing"
)

func TestCompanionLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr net.Addr
		want string
		ok   bool
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 15001}, "[::1]:15001", true},
		{&net.TCPAddr{IP: net.IPv6loopback, Port: 15001}, "127.0.0.1:15001", true},
		{&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8600}, "[::1]:8600", true},
		{&net.UDPAddr{IP: net.IPv6loopback, Port: 53}, "127.0.0.1:53", true},
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 1}, "", false}, // only the loopback the rules name
		{&net.TCPAddr{IP: net.IPv4zero, Port: 1}, "", false},
		{&net.TCPAddr{IP: net.ParseIP("198.18.0.1"), Port: 1}, "", false},
		{&net.UnixAddr{Name: "/x", Net: "unix"}, "", false},
	} {
		got, ok := companionLoopback(tc.addr)
		if got != tc.want || ok != tc.ok {
			t.Errorf("companionLoopback(%v) = %q, %v; want %q, %v", tc.addr, got, ok, tc.want, tc.ok)
		}
	}
}

// TestLoopbackPairClosesFirstOnFailure: a companion that cannot be bound
// for another reason than a missing family is an error, and the first
// socket does not leak.
func TestLoopbackPairClosesFirstOnFailure(t *testing.T) {
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		l.Close()
	}
	taken, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() })
	_, port, _ := net.SplitHostPort(taken.Addr().String())
	var closed int
	_, err = LoopbackPair("127.0.0.1:"+port, func(a string) (net.Listener, net.Addr, error) {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return nil, nil, err
		}
		return ln, ln.Addr(), nil
	}, func(ln net.Listener) { closed++; ln.Close() })
	if err == nil || closed != 1 {
		t.Fatalf("LoopbackPair with the companion port taken: err %v, closed %d; want an error and the first closed", err, closed)
	}
}
