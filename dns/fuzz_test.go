package dns

import (
	"context"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// FuzzHandler feeds raw packets through the same steps as the server:
// header filter, unpack, handle. Whatever arrives, the answer (if any)
// must pack, fit the client's limit, and carry the query's ID. Upstreams
// point at a closed port so forwarding fails fast.
//
//	go test -run '^$' -fuzz FuzzHandler -fuzztime 60s ./dns
func FuzzHandler(f *testing.F) {
	seeds := []*mdns.Msg{
		new(mdns.Msg).SetQuestion("backend.default.svc.cluster.local.", mdns.TypeA),
		new(mdns.Msg).SetQuestion("backend.virtual.consul.", mdns.TypeAAAA),
		new(mdns.Msg).SetQuestion("backend.service.dc1.consul.", mdns.TypeSRV),
		new(mdns.Msg).SetQuestion("example.com.", mdns.TypeANY),
		new(mdns.Msg).SetQuestion("nosuch.virtual.consul.", mdns.TypeA).SetEdns0(4096, true),
	}
	for _, m := range seeds {
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add(make([]byte, 12))

	s, err := New(Config{Mesh: testMesh(), Datacenter: "dc1", Recursors: []string{"127.0.0.1:1"},
		ConsulDNS: "127.0.0.1:1", UpstreamTimeout: 50 * time.Millisecond, QueryTimeout: 100 * time.Millisecond})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) < 12 {
			return // the server drops these before parsing
		}
		req := new(mdns.Msg)
		if err := req.Unpack(raw); err != nil {
			return // the server answers FORMERR from the header alone, or drops
		}
		for _, tcp := range []bool{false, true} {
			resp := s.handle(context.Background(), req.Copy(), tcp)
			if resp == nil {
				if !req.Response {
					t.Fatalf("query dropped: %v", req)
				}
				continue
			}
			b, err := resp.Pack()
			if err != nil {
				t.Fatalf("answer does not pack: %v\n%v", err, resp)
			}
			limit := mdns.MaxMsgSize
			if !tcp {
				limit = mdns.MinMsgSize
				if opt := req.IsEdns0(); opt != nil {
					limit = max(limit, int(min(opt.UDPSize(), upstreamUDPSize)))
				}
			}
			if len(b) > limit {
				t.Fatalf("answer of %d bytes exceeds %d", len(b), limit)
			}
			if resp.Id != req.Id || !resp.Response {
				t.Fatalf("bad answer header: %v", resp)
			}
			back := new(mdns.Msg)
			if err := back.Unpack(b); err != nil {
				t.Fatalf("answer does not parse back: %v", err)
			}
		}
	})
}
