package redirect

import (
	"context"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	ctx := context.Background()
	plans := mustPlans(t, baseConfig())
	ft := withForeign(t)
	bes := map[Family]Backend{IPv4: ft}
	if err := Check(ctx, plans, bes); err == nil || !strings.Contains(err.Error(), "is missing") {
		t.Fatalf("before apply: %v", err)
	}
	if _, err := Apply(ctx, plans, bes); err != nil {
		t.Fatal(err)
	}
	writes := ft.writes
	if err := Check(ctx, plans, bes); err != nil {
		t.Fatalf("after apply: %v", err)
	}
	if ft.writes != writes {
		t.Fatal("Check wrote to the table")
	}
	// A rule gone from an owned chain, then a jump gone from a built-in one.
	if err := ft.exec("-D " + ChainOutput + " -m owner --uid-owner 5995 -j RETURN"); err != nil {
		t.Fatal(err)
	}
	if err := Check(ctx, plans, bes); err == nil || !strings.Contains(err.Error(), "chain "+ChainOutput+" has") {
		t.Fatalf("rule missing: %v", err)
	}
	if _, err := Apply(ctx, plans, bes); err != nil {
		t.Fatal(err)
	}
	if err := ft.exec("-D PREROUTING -p tcp -j " + ChainInbound); err != nil {
		t.Fatal(err)
	}
	if err := Check(ctx, plans, bes); err == nil || !strings.Contains(err.Error(), "PREROUTING jumps") {
		t.Fatalf("jump missing: %v", err)
	}
	if err := Check(ctx, plans, map[Family]Backend{}); err == nil {
		t.Fatal("no backend: passed")
	}
}
