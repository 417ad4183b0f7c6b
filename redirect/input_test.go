package redirect

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"testing"
)

// A file as the kubelet writes it: sorted keys, Go-quoted values.
const downwardAPIFile = `consul.hashicorp.com/connect-inject="true"
consul.hashicorp.com/original-pod="{\"kind\":\"Pod\",\"spec\":{\"x\":\"a=b\"}}"
consul.hashicorp.com/transparent-proxy="true"
consul.hashicorp.com/transparent-proxy-exclude-inbound-ports="8080, 9090"
consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs="198.18.0.0/15,169.254.169.254/32"
consul.hashicorp.com/transparent-proxy-exclude-outbound-ports="443"
consul.hashicorp.com/transparent-proxy-exclude-uids="4242"
kubernetes.io/config.seen="2026-11-25T19:00:00.000000000Z"
`

func TestParseAnnotations(t *testing.T) {
	ann, err := ParseAnnotations(strings.NewReader(downwardAPIFile))
	if err != nil {
		t.Fatal(err)
	}
	if got := ann["consul.hashicorp.com/original-pod"]; got != `{"kind":"Pod","spec":{"x":"a=b"}}` {
		t.Errorf("unquoting: %q", got)
	}
	c := Config{ProxyUserID: it("5995"), ProxyInboundPort: it("20000"), ExcludeUIDs: items("-exclude-uid", "5996")}
	enabled, err := ApplyAnnotations(&c, ann)
	if err != nil || !enabled {
		t.Fatalf("%v %v", enabled, err)
	}
	vals := func(is []Item) []string {
		var out []string
		for _, i := range is {
			out = append(out, i.Value)
		}
		return out
	}
	if got := vals(c.ExcludeInboundPorts); !slices.Equal(got, []string{"8080", "9090"}) {
		t.Errorf("inbound %q", got)
	}
	if got := vals(c.ExcludeUIDs); !slices.Equal(got, []string{"5996", "4242"}) {
		t.Errorf("uids (flags first, then annotations) %q", got)
	}
	if src := c.ExcludeOutboundCIDRs[0].Source; src != "annotation "+AnnotationExcludeOutboundCIDRs {
		t.Errorf("source %q", src)
	}
}

func TestAnnotationsErrors(t *testing.T) {
	for _, tc := range []struct{ file, want string }{
		{"novalue\n", "line 1"},
		{"a=unquoted\n", "not a quoted string"},
		{"a=\"open\n", "not a quoted string"},
		{"a=\"1\"\na=\"2\"\n", "appears twice"},
		{"=\"x\"\n", "line 1"},
	} {
		if _, err := ParseAnnotations(strings.NewReader(tc.file)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.file, err, tc.want)
		}
	}
	for _, tc := range []struct {
		ann  map[string]string
		want string
	}{
		{map[string]string{AnnotationExcludeInboundPorts: "80,,90"}, "element 2"},
		{map[string]string{AnnotationExcludeUIDs: "1,"}, AnnotationExcludeUIDs},
		{map[string]string{AnnotationExcludeOutboundPorts: " "}, "empty"},
		{map[string]string{AnnotationTransparentProxy: "maybe"}, "not a boolean"},
	} {
		var c Config
		if _, err := ApplyAnnotations(&c, tc.ann); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want %q", tc.ann, err, tc.want)
		}
	}
	// Well-formed lists with bad elements fail in Validate, naming the annotation.
	c := Config{ProxyUserID: it("1"), ProxyInboundPort: it("2")}
	if _, err := ApplyAnnotations(&c, map[string]string{AnnotationExcludeOutboundCIDRs: "198.18.0.0/15, nope"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Validate(); err == nil || !strings.Contains(err.Error(), `annotation `+AnnotationExcludeOutboundCIDRs+` "nope"`) {
		t.Errorf("got %v", err)
	}
}

func TestAnnotationsDisable(t *testing.T) {
	var c Config
	enabled, err := ApplyAnnotations(&c, map[string]string{AnnotationTransparentProxy: "false"})
	if err != nil || enabled {
		t.Fatalf("%v %v", enabled, err)
	}
}

// The JSON a default consul-k8s pod gets (reference §1.5).
const consulK8sDefaultJSON = `{"ConsulDNSIP":"127.0.0.1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}`

func TestParseConsulJSON(t *testing.T) {
	c, netns, err := ParseConsulJSON([]byte(consulK8sDefaultJSON))
	if err != nil || netns != "" {
		t.Fatalf("%v %q", err, netns)
	}
	p := mustPlans(t, c)[0]
	want := []string{
		"-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
		"-A OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT",
		"-A OUTPUT -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j CONSUL_DNS_REDIRECT",
		"-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
		"-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
		"-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
		"-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
		"-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
		"-A CONSUL_DNS_REDIRECT -d 127.0.0.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:8600",
		"-A CONSUL_DNS_REDIRECT -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.1:8600",
	}
	var got []string
	for _, l := range strings.Split(p.Restore(), "\n") {
		if strings.HasPrefix(l, "-A") {
			got = append(got, l)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("got\n%s", strings.Join(got, "\n"))
	}

	_, netns, err = ParseConsulJSON([]byte(`{"ProxyUserID":"1","ProxyInboundPort":2,"NetNS":"/var/run/netns/cni-1"}`))
	if err != nil || netns != "/var/run/netns/cni-1" {
		t.Errorf("netns %q %v", netns, err)
	}
}

func TestParseConsulJSONErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"ProxyUser":"1"}`, "unknown field"},
		{`{"ProxyInboundPort":"20000"}`, "ProxyInboundPort"},
		{`{} {}`, "trailing"},
		{`[`, EnvRedirectConfig},
	} {
		if _, _, err := ParseConsulJSON([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.in, err, tc.want)
		}
	}
	c, _, err := ParseConsulJSON([]byte(`{"ProxyUserID":"5995","ProxyInboundPort":-3,"ExcludeUIDs":[""]}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Validate()
	if err == nil || !strings.Contains(err.Error(), EnvRedirectConfig+" field ProxyInboundPort") ||
		!strings.Contains(err.Error(), EnvRedirectConfig+" field ExcludeUIDs") {
		t.Errorf("got %v", err)
	}
}

func FuzzSplitList(f *testing.F) {
	for _, s := range []string{"80", "80,443", " 80 , 443 ", "a,,b", ",", "", "10.0.0.0/8,169.254.169.254"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		items, err := SplitList("-x", s)
		if err != nil {
			if !strings.Contains(err.Error(), "-x") {
				t.Fatalf("error does not name the source: %v", err)
			}
			return
		}
		if len(items) != strings.Count(s, ",")+1 {
			t.Fatalf("%q: %d items", s, len(items))
		}
		for _, i := range items {
			if i.Value == "" || i.Value != strings.TrimSpace(i.Value) || strings.Contains(i.Value, ",") {
				t.Fatalf("%q: bad item %q", s, i.Value)
			}
			// Whatever survives the list parser must not crash validation.
			_, _ = canonicalPortSpec(i.Value)
			_, _ = canonicalCIDR(i.Value)
			_, _ = canonicalUID(i.Value)
		}
	})
}

func FuzzParseAnnotations(f *testing.F) {
	f.Add(downwardAPIFile)
	f.Add("a=\"b\"\n\n")
	f.Add("a=\"\\u00e9\"")
	f.Add("k=\"v\"\nk=\"w\"")
	f.Fuzz(func(t *testing.T, s string) {
		ann, err := ParseAnnotations(strings.NewReader(s))
		if err != nil {
			return
		}
		// Round trip: writing the map the way the kubelet does must give
		// back the same map.
		keys := slices.Collect(maps.Keys(ann))
		sort.Strings(keys)
		var b strings.Builder
		for _, k := range keys {
			fmt.Fprintf(&b, "%s=%q\n", k, ann[k])
		}
		again, err := ParseAnnotations(strings.NewReader(b.String()))
		if err != nil {
			t.Fatalf("re-parse of %q: %v", b.String(), err)
		}
		if !maps.Equal(ann, again) {
			t.Fatalf("round trip changed %v to %v", ann, again)
		}
		c := Config{ProxyUserID: it("1"), ProxyInboundPort: it("2")}
		if _, err := ApplyAnnotations(&c, ann); err == nil {
			if s, err := c.Validate(); err == nil {
				if _, err := Build(s, IPv4, IPv6); err != nil {
					t.Fatalf("valid spec failed to build: %v", err)
				}
			}
		}
	})
}

func FuzzParseConsulJSON(f *testing.F) {
	f.Add(consulK8sDefaultJSON)
	f.Add(`{"ProxyUserID":"1","ProxyInboundPort":2,"ExcludeOutboundCIDRs":["2001:db8::/32","198.18.0.0/15"],"ConsulDNSIP":"::1","ConsulDNSPort":53}`)
	f.Add(`{"ProxyUserID":"1","ProxyInboundPort":2,"ExcludeInboundPorts":["8000:8100","ssh"]}`)
	f.Add(`{}`)
	f.Fuzz(func(t *testing.T, s string) {
		c, _, err := ParseConsulJSON([]byte(s))
		if err != nil {
			return
		}
		spec, err := c.Validate()
		if err != nil {
			return
		}
		plans, err := Build(spec, IPv4, IPv6)
		if err != nil {
			t.Fatalf("valid spec failed to build: %v", err)
		}
		for _, p := range plans {
			// A valid plan must apply to an empty table and be stable.
			ft := newFakeTable()
			if err := replaySteps(t, ft, p); err != nil {
				t.Fatalf("plan does not replay: %v\n%s", err, p.Restore())
			}
			if strings.Contains(p.Restore(), "\n\n") {
				t.Fatalf("blank line in restore file")
			}
		}
	})
}

func TestDualStack(t *testing.T) {
	ann := func(v string) map[string]string { return map[string]string{AnnotationDualStack: v} }
	for _, tc := range []struct {
		name    string
		env     string
		ann     map[string]string
		on, set bool
		source  string
		wantErr string
	}{
		{name: "absent"},
		{name: "env true", env: "true", on: true, set: true, source: EnvDualStack},
		{name: "env false", env: "false", set: true, source: EnvDualStack},
		{name: "annotation true", ann: ann("true"), on: true, set: true, source: "annotation " + AnnotationDualStack},
		{name: "annotation wins", env: "false", ann: ann(" TRUE "), on: true, set: true, source: "annotation " + AnnotationDualStack},
		{name: "bad env", env: "yes please", wantErr: EnvDualStack},
		{name: "bad annotation", ann: ann(""), wantErr: AnnotationDualStack},
	} {
		t.Run(tc.name, func(t *testing.T) {
			on, set, source, err := DualStack(tc.env, tc.ann)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil || on != tc.on || set != tc.set || source != tc.source {
				t.Fatalf("got %v %v %q %v, want %v %v %q", on, set, source, err, tc.on, tc.set, tc.source)
			}
		})
	}
}
