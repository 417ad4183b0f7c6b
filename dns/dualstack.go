package dns

import (
	"net"

	"github.com/ferrymesh/ferry/listener"
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

// listenDualStack binds addr (UDP and TCP) and, on a loopback address, the
// other family's loopback at the same port (listener.LoopbackPair): the
// redirect rules DNAT each family's port-53 queries to its own loopback.
func listenDualStack(addr string) ([]socketPair, error) {
	return listener.LoopbackPair(addr, func(a string) (socketPair, net.Addr, error) {
		pc, ln, err := listenBoth(a)
		if err != nil {
			return socketPair{}, nil, err
		}
		return socketPair{pc, ln}, pc.LocalAddr(), nil
	}, socketPair.close)
}
