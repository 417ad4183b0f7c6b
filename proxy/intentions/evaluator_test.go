package intentions

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// ixn builds an intention; src and dst are "ns/name" or "name" (ns default).
func ixn(src, dst string, action api.IntentionAction) *api.Intention {
	sns, sname := split(src)
	dns, dname := split(dst)
	x := &api.Intention{SourceNS: sns, SourceName: sname, DestinationNS: dns, DestinationName: dname, Action: action}
	x.Precedence = precedence(x)
	return x
}

func l7(src, dst string) *api.Intention {
	x := ixn(src, dst, "")
	x.Permissions = []*api.IntentionPermission{{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}}}
	return x
}

func split(s string) (ns, name string) {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return s[:i], s[i+1:]
	}
	return "default", s
}

// precedence mirrors Consul's structs.Intention.UpdatePrecedence (CE).
func precedence(x *api.Intention) int {
	exact := func(ns, name string) int {
		switch {
		case ns == Wildcard:
			return 0
		case name == Wildcard:
			return 1
		}
		return 2
	}
	var maxP int
	switch exact(x.DestinationNS, x.DestinationName) {
	case 2:
		maxP = 9
	case 1:
		maxP = 6
	default:
		maxP = 3
	}
	return maxP - (2 - exact(x.SourceNS, x.SourceName))
}

const (
	allow = api.IntentionActionAllow
	deny  = api.IntentionActionDeny
)

func TestDecideTable(t *testing.T) {
	web := Source{Name: "web"}
	api_ := Source{Name: "api", Namespace: "default", Partition: "default"}
	tests := []struct {
		name         string
		ixns         []*api.Intention
		defaultAllow bool
		src          Source
		want         Decision
	}{
		{"empty default allow", nil, true, web, Decision{true, ReasonDefault, ""}},
		{"empty default deny", nil, false, web, Decision{false, ReasonDefault, ""}},
		{"exact allow", []*api.Intention{ixn("web", "db", allow)}, false, web,
			Decision{true, "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)", "default/web => default/db (Precedence: 9, Action: ALLOW)"}},
		{"exact allow other source takes default", []*api.Intention{ixn("web", "db", allow)}, false, api_,
			Decision{false, ReasonDefault, ""}},
		{"exact beats star deny", []*api.Intention{ixn("web", "db", allow), ixn("*", "db", deny)}, true, web,
			Decision{true, "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)", "default/web => default/db (Precedence: 9, Action: ALLOW)"}},
		{"star deny catches the rest", []*api.Intention{ixn("web", "db", allow), ixn("*", "db", deny)}, true, api_,
			Decision{false, "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)", "default/* => default/db (Precedence: 8, Action: DENY)"}},
		{"star to db beats web to star", []*api.Intention{ixn("*", "db", deny), ixn("web", "*", allow)}, true, web,
			Decision{false, "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)", "default/* => default/db (Precedence: 8, Action: DENY)"}},
		{"web to star beats star star", []*api.Intention{ixn("web", "*", deny), ixn("*", "*", allow)}, true, web,
			Decision{false, "Matched L4 intention: default/web => default/* (Precedence: 6, Action: DENY)", "default/web => default/* (Precedence: 6, Action: DENY)"}},
		{"star star", []*api.Intention{ixn("web", "*", deny), ixn("*", "*", allow)}, false, api_,
			Decision{true, "Matched L4 intention: default/* => default/* (Precedence: 5, Action: ALLOW)", "default/* => default/* (Precedence: 5, Action: ALLOW)"}},
		{"namespace mismatch skips exact", []*api.Intention{ixn("web", "db", allow)}, false, Source{Name: "web", Namespace: "other"},
			Decision{false, ReasonDefault, ""}},
		{"wildcard namespace matches other ns", []*api.Intention{ixn("web", "db", allow), ixn("*/*", "db", deny)}, true, Source{Name: "web", Namespace: "other"},
			Decision{false, "Matched L4 intention: */* => default/db (Precedence: 7, Action: DENY)", "*/* => default/db (Precedence: 7, Action: DENY)"}},
		{"ns star name exact (rejected by Consul, handled)", []*api.Intention{ixn("*/web", "db", deny)}, true, Source{Name: "web", Namespace: "x"},
			Decision{false, "Matched L4 intention: */web => default/db (Precedence: 7, Action: DENY)", "*/web => default/db (Precedence: 7, Action: DENY)"}},
		{"L7 is deny", []*api.Intention{l7("web", "db"), ixn("*", "db", allow)}, true, web,
			Decision{false, "Matched L7 intention: default/web => default/db (Precedence: 9, Permissions: 1)", "default/web => default/db (Precedence: 9, Permissions: 1)"}},
		{"L7 for one source leaves others", []*api.Intention{l7("web", "db"), ixn("*", "db", allow)}, false, api_,
			Decision{true, "Matched L4 intention: default/* => default/db (Precedence: 8, Action: ALLOW)", "default/* => default/db (Precedence: 8, Action: ALLOW)"}},
		{"foreign partition", []*api.Intention{ixn("*", "db", allow)}, true, Source{Name: "web", Partition: "Team"},
			Decision{false, `Mismatched partitions: "team" != "default"`, ""}},
		{"partition case-insensitive default", []*api.Intention{ixn("*", "db", deny)}, true, Source{Name: "web", Partition: "DEFAULT"},
			Decision{false, "Matched L4 intention: default/* => default/db (Precedence: 8, Action: DENY)", "default/* => default/db (Precedence: 8, Action: DENY)"}},
		{"unknown action is deny", []*api.Intention{ixn("web", "db", "maybe")}, true, web,
			Decision{false, "Matched L4 intention: default/web => default/db (Precedence: 9, Action: MAYBE)", "default/web => default/db (Precedence: 9, Action: MAYBE)"}},
		{"unsorted input is sorted by precedence", []*api.Intention{ixn("*", "db", deny), ixn("web", "db", allow)}, true, web,
			Decision{true, "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)", "default/web => default/db (Precedence: 9, Action: ALLOW)"}},
		{"peer source never matches", []*api.Intention{func() *api.Intention { x := ixn("web", "db", deny); x.SourcePeer = "p"; return x }()}, true, web,
			Decision{true, ReasonDefault, ""}},
		{"other source partition never matches", []*api.Intention{func() *api.Intention { x := ixn("web", "db", deny); x.SourcePartition = "p"; return x }()}, true, web,
			Decision{true, ReasonDefault, ""}},
		{"explicit default partition matches", []*api.Intention{func() *api.Intention { x := ixn("web", "db", deny); x.SourcePartition = "default"; return x }()}, true, web,
			Decision{false, "Matched L4 intention: default/default/web => default/db (Precedence: 9, Action: DENY)", "default/default/web => default/db (Precedence: 9, Action: DENY)"}},
		{"nil intention ignored", []*api.Intention{nil}, false, web, Decision{false, ReasonDefault, ""}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := NewEvaluator(tc.ixns, tc.defaultAllow).Decide(tc.src)
			if got != tc.want {
				t.Errorf("Decide(%+v)\n got  %+v\n want %+v", tc.src, got, tc.want)
			}
		})
	}
}

func TestDescribeWithID(t *testing.T) {
	x := ixn("web", "db", allow)
	x.ID = "abc"
	if got, want := Describe(x), "default/web => default/db (ID: abc, Precedence: 9, Action: ALLOW)"; got != want {
		t.Fatalf("got %q want %q", got, want)
	}
}

// naive is an independent transcription of the agent's ConnectAuthorize loop
// over raw intentions (agent/connect_auth.go, connect.AuthorizeIntentionTarget).
func naive(ixns []*api.Intention, def bool, src Source) (bool, *api.Intention) {
	ns := src.Namespace
	if ns == "" {
		ns = "default"
	}
	sorted := slices.Clone(ixns)
	slices.SortStableFunc(sorted, func(a, b *api.Intention) int { return b.Precedence - a.Precedence })
	for _, x := range sorted {
		if x.SourceNS != "*" && x.SourceNS != ns {
			continue
		}
		if x.SourceName != "*" && x.SourceName != src.Name {
			continue
		}
		if len(x.Permissions) > 0 {
			return false, x
		}
		return x.Action == allow, x
	}
	return def, nil
}

// TestDecideMatchesNaive compares the compiled fast path with a transcription
// of the agent's loop on random intention lists.
func TestDecideMatchesNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	names := []string{"*", "web", "api", "db"}
	nss := []string{"*", "default", "other"}
	pick := func(s []string) string { return s[r.IntN(len(s))] }
	for iter := range 2000 {
		var ixns []*api.Intention
		seen := map[string]bool{}
		for range r.IntN(8) {
			sns, sname := pick(nss), pick(names)
			if sns == "*" && r.IntN(3) > 0 {
				sname = "*" // mostly valid Consul shapes, sometimes */name
			}
			dst := pick([]string{"db", "*"})
			k := sns + "/" + sname + ">" + dst
			if seen[k] {
				continue // Consul keeps one source per destination entry
			}
			seen[k] = true
			var x *api.Intention
			switch r.IntN(5) {
			case 0:
				if dst == "*" {
					x = ixn(sns+"/"+sname, dst, deny)
				} else {
					x = l7(sns+"/"+sname, dst)
				}
			case 1, 2:
				x = ixn(sns+"/"+sname, dst, allow)
			default:
				x = ixn(sns+"/"+sname, dst, deny)
			}
			ixns = append(ixns, x)
		}
		r.Shuffle(len(ixns), func(i, j int) { ixns[i], ixns[j] = ixns[j], ixns[i] })
		def := r.IntN(2) == 0
		ev := NewEvaluator(ixns, def)
		for _, ns := range append(nss[1:], "", "third") {
			for _, name := range append(names[1:], "stranger") {
				src := Source{Name: name, Namespace: ns}
				got := ev.Decide(src)
				wantAllow, wantIxn := naive(ixns, def, src)
				wantDesc := ""
				if wantIxn != nil {
					wantDesc = Describe(wantIxn)
				}
				if got.Allow != wantAllow || got.Intention != wantDesc {
					var b strings.Builder
					for _, x := range ixns {
						fmt.Fprintf(&b, "  %s\n", Describe(x))
					}
					t.Fatalf("iter %d, default %v, source %+v:\n got %+v\n want allow=%v by %q\nintentions:\n%s",
						iter, def, src, got, wantAllow, wantDesc, b.String())
				}
			}
		}
	}
}

func TestEvaluatorEqualAndL7(t *testing.T) {
	a := NewEvaluator([]*api.Intention{ixn("web", "db", allow), l7("api", "db")}, true)
	b := NewEvaluator([]*api.Intention{ixn("web", "db", allow), l7("api", "db")}, true)
	c := NewEvaluator([]*api.Intention{ixn("web", "db", deny), l7("api", "db")}, true)
	d := NewEvaluator([]*api.Intention{ixn("web", "db", allow), l7("api", "db")}, false)
	if !a.Equal(b) || a.Equal(c) || a.Equal(d) || a.Equal(nil) {
		t.Fatalf("Equal: a=b %v a=c %v a=d %v", a.Equal(b), a.Equal(c), a.Equal(d))
	}
	if got := a.L7(); len(got) != 1 || !strings.Contains(got[0], "default/api => default/db") {
		t.Fatalf("L7() = %q", got)
	}
	if a.Len() != 2 || !a.DefaultAllow() || d.DefaultAllow() {
		t.Fatalf("Len %d DefaultAllow %v/%v", a.Len(), a.DefaultAllow(), d.DefaultAllow())
	}
}

func TestDecideDoesNotAllocate(t *testing.T) {
	ev := NewEvaluator([]*api.Intention{ixn("web", "db", allow), ixn("default/*", "db", deny), ixn("*/*", "*", allow)}, false)
	for _, src := range []Source{{Name: "web"}, {Name: "stranger"}, {Name: "x", Namespace: "other"}} {
		if n := testing.AllocsPerRun(100, func() { _ = ev.Decide(src) }); n != 0 {
			t.Errorf("Decide(%+v): %v allocs", src, n)
		}
	}
}

func TestEvaluatorEqualSeesDescriptionChange(t *testing.T) {
	a := NewEvaluator([]*api.Intention{ixn("web", "db", allow)}, true)
	b := NewEvaluator([]*api.Intention{ixn("web", "*", allow)}, true)
	if a.Equal(b) {
		t.Fatal("evaluators with different deciding intentions compare equal")
	}
}
