package intentions

import (
	"sync/atomic"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestTrackerRevokesOnlyNewlyDenied(t *testing.T) {
	tr := NewTracker()
	closed := map[string]*atomic.Int32{}
	track := func(name, key string) func() {
		c := &atomic.Int32{}
		closed[key] = c
		return tr.Track(Source{Name: name}, func() { c.Add(1) })
	}
	track("web", "web1")
	track("web", "web2")
	track("api", "api1")
	untrackAdmin := track("admin", "admin1")
	track("batch", "batch1")
	untrackAdmin() // ended before the change: must not be closed

	if got := tr.Len(); got != 4 {
		t.Fatalf("Len = %d, want 4", got)
	}
	// Before: everything allowed. After: web and admin denied explicitly,
	// everyone else allowed except by default... batch still allowed by *.
	ev := NewEvaluator([]*api.Intention{
		ixn("web", "db", deny), ixn("admin", "db", deny), ixn("*", "db", allow),
	}, false)
	rev := tr.Revoke(ev)
	if len(rev) != 1 || rev[0].Source.Name != "web" || rev[0].Conns != 2 || rev[0].Decision.Allow {
		t.Fatalf("Revoke = %+v, want web with 2 conns", rev)
	}
	for key, want := range map[string]int32{"web1": 1, "web2": 1, "api1": 0, "admin1": 0, "batch1": 0} {
		if got := closed[key].Load(); got != want {
			t.Errorf("%s closed %d times, want %d", key, got, want)
		}
	}
	if got := tr.Len(); got != 2 {
		t.Fatalf("Len after revoke = %d, want 2", got)
	}
	// A second revoke with the same evaluator closes nothing more, and
	// revoking everything closes each conn exactly once.
	if rev := tr.Revoke(ev); len(rev) != 0 {
		t.Fatalf("second Revoke = %+v", rev)
	}
	tr.Revoke(NewEvaluator(nil, false))
	for key, c := range closed {
		if key != "admin1" && c.Load() != 1 {
			t.Errorf("%s closed %d times, want 1", key, c.Load())
		}
	}
	if tr.Len() != 0 {
		t.Fatalf("Len = %d after revoking all", tr.Len())
	}
}

func TestTrackerUntrackIdempotentAndNormalized(t *testing.T) {
	tr := NewTracker()
	u1 := tr.Track(Source{Name: "web"}, func() {})
	u2 := tr.Track(Source{Name: "web", Namespace: "default", Partition: "Default"}, func() {})
	if len(tr.groups) != 1 {
		t.Fatalf("groups = %d, want one group for equivalent sources", len(tr.groups))
	}
	u1()
	u1()
	if tr.Len() != 1 {
		t.Fatalf("Len = %d, want 1", tr.Len())
	}
	u2()
	if tr.Len() != 0 || len(tr.groups) != 0 {
		t.Fatalf("Len = %d groups = %d, want empty", tr.Len(), len(tr.groups))
	}
}
