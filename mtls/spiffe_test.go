package mtls_test

import (
	"net/url"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/mtls"
)

const td = "11111111-2222-3333-4444-555555555555.consul"

func TestParseSpiffeID(t *testing.T) {
	tests := []struct {
		in      string
		want    mtls.SpiffeID
		str     string // canonical String(); "" = same as in
		wantErr string
	}{
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/web",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"}},
		{in: "spiffe://" + td + "/ap/team-a/ns/billing/dc/eu-1/svc/api",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "team-a", Namespace: "billing", Datacenter: "eu-1", Service: "api"}},
		{in: "spiffe://" + td + "/ap/default/ns/default/dc/dc1/svc/web",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
			str:  "spiffe://" + td + "/ns/default/dc/dc1/svc/web"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/we%2Fb",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "we/b"},
		},
		{in: "spiffe://" + td + "/ns/default/dc/dc%201/svc/web",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc 1", Service: "web"}},
		{in: "SPIFFE://" + td + "/ns/default/dc/dc1/svc/web",
			want: mtls.SpiffeID{TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
			str:  "spiffe://" + td + "/ns/default/dc/dc1/svc/web"},
		{in: "https://" + td + "/ns/default/dc/dc1/svc/web", wantErr: "not spiffe"},
		{in: "spiffe:///ns/default/dc/dc1/svc/web", wantErr: "empty trust domain"},
		{in: "spiffe://" + td, wantErr: "empty path"},
		{in: "spiffe://" + td + "/agent/client/dc/dc1/id/node1", wantErr: "not a service identity"},
		{in: "spiffe://" + td + "/agent/server/dc/dc1", wantErr: "not a service identity"},
		{in: "spiffe://" + td + "/gateway/mesh/dc/dc1", wantErr: "not a service identity"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/", wantErr: "empty service"},
		{in: "spiffe://" + td + "/ns//dc/dc1/svc/web", wantErr: "empty namespace"},
		{in: "spiffe://" + td + "/ap//ns/default/dc/dc1/svc/web", wantErr: "empty partition"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/web/extra", wantErr: "not a service identity"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/web?x=1", wantErr: "query"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/web#f", wantErr: "fragment"},
		{in: "spiffe://u@" + td + "/ns/default/dc/dc1/svc/web", wantErr: "user info"},
		{in: "spiffe://" + td + ":8443/ns/default/dc/dc1/svc/web", wantErr: "port"},
		{in: "spiffe:" + td, wantErr: "not a hierarchical"},
		{in: "spiffe://" + td + "/ns/default/dc/dc1/svc/%zz", wantErr: "invalid URL escape"},
		{in: "", wantErr: "not spiffe"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := mtls.ParseSpiffeID(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseSpiffeID(%q) = %+v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSpiffeID(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseSpiffeID(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			str := tt.str
			if str == "" {
				str = tt.in
			}
			if got.String() != str {
				t.Fatalf("String() = %q, want %q", got.String(), str)
			}
		})
	}
}

func TestSpiffeIDFromURLNil(t *testing.T) {
	if _, err := mtls.SpiffeIDFromURL(nil); err == nil {
		t.Fatal("want error for nil URL")
	}
	u, _ := url.Parse("spiffe://" + td + "/ns/default/dc/dc1/svc/web")
	if id, err := mtls.SpiffeIDFromURL(u); err != nil || id.Service != "web" {
		t.Fatalf("SpiffeIDFromURL = %+v, %v", id, err)
	}
}

func TestServiceSNI(t *testing.T) {
	tests := []struct {
		svc, ns, ap, dc, want string
	}{
		{"web", "", "", "dc1", "web.default.dc1.internal." + td},
		{"web", "default", "default", "dc1", "web.default.dc1.internal." + td},
		{"web", "billing", "", "dc2", "web.billing.dc2.internal." + td},
		{"web", "default", "team-a", "dc1", "web.default.team-a.dc1.internal-v1." + td},
	}
	for _, tt := range tests {
		if got := mtls.ServiceSNI(tt.svc, tt.ns, tt.ap, tt.dc, td); got != tt.want {
			t.Errorf("ServiceSNI(%q,%q,%q,%q) = %q, want %q", tt.svc, tt.ns, tt.ap, tt.dc, got, tt.want)
		}
	}
	id := mtls.ServiceID(td, "dc1", "web")
	if got := id.SNI(); got != "web.default.dc1.internal."+td {
		t.Errorf("SNI() = %q", got)
	}
}

func FuzzParseSpiffeID(f *testing.F) {
	for _, s := range []string{
		"spiffe://" + td + "/ns/default/dc/dc1/svc/web",
		"spiffe://" + td + "/ap/p/ns/n/dc/d/svc/s",
		"spiffe://x/ns/a%2Fb/dc/d/svc/s",
		"spiffe://x/agent/client/dc/dc1/id/n",
		"spiffe:opaque", "::", "spiffe://x/ns/%zz/dc/d/svc/s",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := mtls.ParseSpiffeID(s)
		if err != nil {
			return
		}
		// A parsed ID must print to something that parses back to itself.
		again, err := mtls.ParseSpiffeID(id.String())
		if err != nil {
			t.Fatalf("reparse of %q (from %q): %v", id.String(), s, err)
		}
		if id.Partition == "" || again != normPartition(id) {
			t.Fatalf("round trip %q: %+v != %+v", s, again, id)
		}
	})
}

// normPartition mirrors String's lower-casing of the partition.
func normPartition(id mtls.SpiffeID) mtls.SpiffeID {
	id.Partition = strings.ToLower(id.Partition)
	return id
}
