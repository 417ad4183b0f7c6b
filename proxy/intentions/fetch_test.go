package intentions

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// httpAgent serves the two endpoints ConsulFetcher reads. self is the body
// of /v1/agent/self ("" = 403, as without agent:read); aclHeader is the
// X-Consul-Default-ACL-Policy of every answer ("" = none).
type httpAgent struct {
	self      atomic.Pointer[string]
	aclHeader string
	selfCalls atomic.Int32
}

func newHTTPAgent(self, aclHeader string) *httpAgent {
	a := &httpAgent{aclHeader: aclHeader}
	a.self.Store(&self)
	return a
}

func (f *httpAgent) start(t *testing.T) *api.Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// As the agent does (setMeta). The api client parses
		// X-Consul-Default-ACL-Policy only after a valid LastContact.
		w.Header().Set("X-Consul-LastContact", "0")
		w.Header().Set("X-Consul-KnownLeader", "true")
		if f.aclHeader != "" {
			w.Header().Set("X-Consul-Default-ACL-Policy", f.aclHeader)
		}
		switch r.URL.Path {
		case "/v1/agent/self":
			f.selfCalls.Add(1)
			self := *f.self.Load()
			if self == "" {
				http.Error(w, "Permission denied: token lacks permission 'agent:read'", http.StatusForbidden)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(self))
		case "/v1/connect/intentions/match":
			w.Header().Set("X-Consul-Index", "7")
			_ = json.NewEncoder(w).Encode(map[string][]*api.Intention{"web": {}})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	c, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(srv.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func selfWith(policy string) string {
	return `{"Config":{"Version":"1.18.1"},"DebugConfig":{"ACLsEnabled":true,"DefaultIntentionPolicy":"` + policy + `"}}`
}

const selfOld = `{"Config":{"Version":"1.14.11"},"DebugConfig":{"ACLsEnabled":false}}`

func TestConsulFetcherDefaultPolicy(t *testing.T) {
	cases := []struct {
		name      string
		flag      Policy
		self      string
		aclHeader string
		allow     bool
		source    string
		note      string // substring of DefaultNote ("" = none expected)
	}{
		{name: "flag allow wins over agent deny", flag: PolicyAllow, self: selfWith("deny"), aclHeader: "deny", allow: true, source: DefaultFromFlag},
		{name: "flag deny wins over agent allow", flag: PolicyDeny, self: selfWith("allow"), aclHeader: "allow", allow: false, source: DefaultFromFlag},
		{name: "agent deny over ACL allow", self: selfWith("deny"), aclHeader: "allow", allow: false, source: DefaultFromAgent},
		{name: "agent allow over ACL deny", self: selfWith("allow"), aclHeader: "deny", allow: true, source: DefaultFromAgent},
		{name: "agent unset uses ACL deny", self: selfWith(""), aclHeader: "deny", allow: false, source: DefaultFromACL},
		{name: "old agent uses ACL allow", self: selfOld, aclHeader: "allow", allow: true, source: DefaultFromACL},
		{name: "old agent uses ACL deny", self: selfOld, aclHeader: "deny", allow: false, source: DefaultFromACL},
		{name: "no agent:read uses ACL header", self: "", aclHeader: "allow", allow: true, source: DefaultFromACL, note: "agent:read"},
		{name: "agent value unknown denies", self: selfWith("maybe"), aclHeader: "allow", allow: false, source: DefaultFromUnknown, note: "neither allow nor deny"},
		{name: "nothing established denies", self: "", aclHeader: "", allow: false, source: DefaultFromUnknown, note: "denying"},
		{name: "no header, agent unset denies", self: selfOld, aclHeader: "", allow: false, source: DefaultFromUnknown, note: "X-Consul-Default-ACL-Policy"},
		{name: "odd header denies", self: selfOld, aclHeader: "extend-cache", allow: false, source: DefaultFromUnknown, note: "denying"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fa := newHTTPAgent(tc.self, tc.aclHeader)
			fetch := ConsulFetcher(fa.start(t), "web", time.Second, tc.flag)
			snap, err := fetch(context.Background(), 0)
			if err != nil {
				t.Fatal(err)
			}
			if snap.DefaultAllow != tc.allow || snap.DefaultSource != tc.source {
				t.Fatalf("default allow=%v source=%q (note %q), want allow=%v source=%q",
					snap.DefaultAllow, snap.DefaultSource, snap.DefaultNote, tc.allow, tc.source)
			}
			if (tc.note == "") != (snap.DefaultNote == "") || !strings.Contains(snap.DefaultNote, tc.note) {
				t.Fatalf("note %q, want one containing %q", snap.DefaultNote, tc.note)
			}
			if tc.flag != PolicyFromConsul && fa.selfCalls.Load() != 0 {
				t.Fatalf("explicit policy still asked the agent (%d calls)", fa.selfCalls.Load())
			}
		})
	}
}

// The agent's setting is configuration: read once when it answers, asked
// again on every fetch while it does not.
func TestConsulFetcherAgentPolicyCached(t *testing.T) {
	fa := newHTTPAgent("", "allow")
	fetch := ConsulFetcher(fa.start(t), "web", time.Second, PolicyFromConsul)
	for i := 0; i < 2; i++ {
		if snap, err := fetch(context.Background(), 0); err != nil || snap.DefaultSource != DefaultFromACL {
			t.Fatalf("fetch %d: %+v %v", i, snap, err)
		}
	}
	if n := fa.selfCalls.Load(); n != 2 {
		t.Fatalf("agent/self asked %d times while failing, want 2", n)
	}
	deny := selfWith("deny")
	fa.self.Store(&deny)
	for i := 0; i < 3; i++ {
		snap, err := fetch(context.Background(), 0)
		if err != nil || snap.DefaultAllow || snap.DefaultSource != DefaultFromAgent {
			t.Fatalf("fetch after agent answered: %+v %v", snap, err)
		}
	}
	if n := fa.selfCalls.Load(); n != 3 {
		t.Fatalf("agent/self asked %d times, want 3 (cached after the first answer)", n)
	}
}

func TestParsePolicy(t *testing.T) {
	for in, want := range map[string]Policy{"": PolicyFromConsul, "allow": PolicyAllow, "deny": PolicyDeny} {
		if got, err := ParsePolicy(in); err != nil || got != want {
			t.Errorf("ParsePolicy(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"Allow", "DENY", "yes", " deny"} {
		if _, err := ParsePolicy(in); err == nil {
			t.Errorf("ParsePolicy(%q) accepted", in)
		}
	}
}
