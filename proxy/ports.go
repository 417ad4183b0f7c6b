package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/hashicorp/consul/api"
)

// LocalPortsKey is the Proxy.Config key listing the app's ports, besides
// LocalServicePort, that a DialedDirectly client may reach through the
// sidecar: e.g. "ferry_local_ports": [9090, 9443]. A connection whose
// original destination is one of them goes to LocalServiceAddress at that
// port; any other port goes to LocalServicePort, as with Envoy. consul-k8s
// refuses multi-port services under transparent proxy; this is the opt-in.
const LocalPortsKey = "ferry_local_ports"

type portMap struct {
	host  string
	extra map[uint16]bool
}

func portsFromService(svc *api.AgentService) (*portMap, error) {
	pm := &portMap{host: svc.Proxy.LocalServiceAddress, extra: map[uint16]bool{}}
	if pm.host == "" {
		pm.host = "127.0.0.1"
	}
	v, ok := svc.Proxy.Config[LocalPortsKey]
	if !ok {
		return pm, nil
	}
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("proxy config %s: want a list of ports, got %T", LocalPortsKey, v)
	}
	for _, e := range list {
		p, err := portValue(e)
		if err != nil {
			return nil, fmt.Errorf("proxy config %s: %w", LocalPortsKey, err)
		}
		pm.extra[uint16(p)] = true
	}
	return pm, nil
}

// localPort maps an inbound connection's original destination to the app
// address to dial when it is a declared extra port.
func (s *Sidecar) localPort(dst netip.AddrPort) (string, bool) {
	pm := s.ports.Load()
	if pm == nil || !pm.extra[dst.Port()] {
		return "", false
	}
	return net.JoinHostPort(pm.host, strconv.Itoa(int(dst.Port()))), true
}
