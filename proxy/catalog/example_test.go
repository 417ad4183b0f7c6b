package catalog_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"

	"github.com/hashicorp/consul/api"

	"github.com/ferrymesh/ferry/proxy/catalog"
)

// How the outbound path uses the view: match the original destination IP,
// then either load-balance over the service's instances, dial the original
// address (DialedDirectly), pass through, or refuse.
func Example() {
	client, _ := api.NewClient(api.DefaultConfig())
	ctx := context.Background()
	view := catalog.Start(ctx, catalog.ConsulSource{Client: client}, catalog.Options{})
	defer view.Close()
	<-view.Ready()

	tlsFor := func(svc catalog.Service) *tls.Config { return &tls.Config{} } // from mtls

	dst := netip.MustParseAddrPort("240.0.0.1:80") // SO_ORIGINAL_DST
	m, ok := view.Lookup(dst.Addr())
	switch {
	case ok && m.Direct:
		// DialedDirectly: mTLS to the original address:port.
		_, _ = tls.Dial("tcp", dst.String(), tlsFor(m.Service))
	case ok:
		conn, inst, err := view.Dial(ctx, m.Service, func(ctx context.Context, in catalog.Instance) (net.Conn, error) {
			d := tls.Dialer{Config: tlsFor(in.Service)}
			return d.DialContext(ctx, "tcp", in.Addr.String())
		})
		_, _, _ = conn, inst, err
	case view.MeshDestinationsOnly():
		// refuse (reset), log, count
	default:
		// plain TCP passthrough to dst
	}
}
