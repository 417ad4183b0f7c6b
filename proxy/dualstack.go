package proxy

import (
	"context"
	"net"

	"github.com/ferrymesh/ferry/listener"
)

// listenLoopbackPair binds addr and, on a loopback address, the other
// family's loopback at the same port (listener.LoopbackPair), merged into
// one acceptor. Consul's Envoy binds 127.0.0.1 only, which refuses the
// IPv6 REDIRECT of a dual-stack pod.
func listenLoopbackPair(ctx context.Context, listen func(context.Context, string) (listener.TCPAcceptor, error), addr string) (listener.TCPAcceptor, error) {
	lns, err := listener.LoopbackPair(addr, func(a string) (listener.TCPAcceptor, net.Addr, error) {
		ln, err := listen(ctx, a)
		if err != nil {
			return nil, nil, err
		}
		return ln, ln.Addr(), nil
	}, func(ln listener.TCPAcceptor) { ln.Close() })
	if err != nil {
		return nil, err
	}
	if len(lns) == 1 {
		return lns[0], nil
	}
	return listener.Merge(lns[0], lns[1:]...), nil
}
