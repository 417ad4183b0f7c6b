package catalog

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// FuzzNodeDump feeds arbitrary agent answers for the node dump
// (/v1/internal/ui/nodes) through the decoder, the record extraction and
// the routing table: a truncated body, wrong types or absurd addresses must
// be an error or an empty view, never a panic, and every address the table
// routes must be one a record claimed.
func FuzzNodeDump(f *testing.F) {
	for _, s := range []string{
		`[{"Node":"n1","Address":"10.0.0.1","Services":[{"Kind":"connect-proxy","ID":"web-sidecar","Service":"web-sidecar-proxy","Address":"10.0.0.2",` +
			`"TaggedAddresses":{"consul-virtual":{"Address":"240.0.0.1"},"virtual":{"Address":"10.96.0.10"}},` +
			`"Proxy":{"DestinationServiceName":"web","TransparentProxy":{"DialedDirectly":true}},"ModifyIndex":7}]}]`,
		`[{"Node":"n1","Address":"::ffff:10.0.0.1","Services":[{"Kind":"","ID":"nat","Service":"native","Connect":{"Native":true},"Namespace":"ns","Partition":"p"}]}]`,
		`[{"Node":"n1","Services":[{"Kind":"connect-proxy","Proxy":{"DestinationServiceName":"a"},"TaggedAddresses":{"virtual":{"Address":"fe80::1%eth0"}}},` +
			`{"Kind":"connect-proxy","Proxy":{"DestinationServiceName":"b"},"Address":"10.0.0.2","PeerName":"peer"}]}]`,
		`[{"Node":"n1","Services":[{"Kind":"connect-proxy","Proxy":{"DestinationServiceName":"a"},"Address":"10.0.0.2"},{"Kind":"connect-proxy","Proxy":{"DestinationServiceName":"b"},"Address":"10.0.0.2"}]}]`,
		`[{"Node":"n1","Services":[{"Kind":"connect-proxy","Proxy":null}]`,
		`[{"Node":1,"Services":"x"}]`, `{}`, `null`, `[]`,
	} {
		f.Add([]byte(s), "dc1", true)
	}
	f.Fuzz(func(t *testing.T, body []byte, dc string, ddGlobal bool) {
		var dump []dumpNode
		if json.Unmarshal(body, &dump) != nil {
			return
		}
		recs := proxiesFromDump(dump)
		claimed := map[netip.Addr]bool{}
		for _, r := range recs {
			if r.Service.Name == "" {
				t.Fatalf("record without a service name: %+v", r)
			}
			for _, a := range []netip.Addr{r.Addr, r.ConsulVirtual, r.Virtual} {
				if a.IsValid() {
					if a.Zone() != "" || a.Is4In6() {
						t.Fatalf("address %v kept a zone or a v4-in-v6 form", a)
					}
					claimed[a] = true
				}
			}
		}
		cidrs := []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
		for _, c := range [][]netip.Prefix{nil, cidrs} {
			tb := buildTable(recs, map[string]bool{"web": true}, ddGlobal, dc, c)
			for a := range tb.byIP {
				if !claimed[a] {
					t.Fatalf("table routes %v, which no record claimed", a)
				}
			}
		}
	})
}
