package redirect

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func mustPlans(t *testing.T, c Config, fams ...Family) []Plan {
	t.Helper()
	s, err := c.Validate()
	if err != nil {
		t.Fatalf("validate: %v", err)
	}
	ps, err := Build(s, fams...)
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	return ps
}

func baseConfig() Config {
	return Config{
		ProxyUserID:      Item{Value: "5995", Source: "-proxy-uid"},
		ProxyInboundPort: Item{Value: "20000", Source: "-proxy-inbound-port"},
		ConsulDNSPort:    Item{Value: "8600", Source: "-consul-dns-port"},
		ExcludeUIDs:      []Item{{Value: "5996", Source: "-exclude-uid"}},
		ExcludeOutboundCIDRs: []Item{
			{Value: "198.18.0.0/15", Source: "-exclude-outbound-cidr"},
			{Value: "2001:db8::/32", Source: "-exclude-outbound-cidr"},
		},
		ExcludeInboundPorts: []Item{{Value: "21000", Source: "-exclude-inbound-port"}, {Value: "20200", Source: "-exclude-inbound-port"}},
	}
}

// withForeign seeds a table with rules ferry does not own, before and
// after which ferry's must leave them alone.
func withForeign(t *testing.T) *fakeTable {
	t.Helper()
	ft := newFakeTable()
	for _, cmd := range []string{
		"-N USER_CHAIN",
		"-A USER_CHAIN -p udp -j RETURN",
		"-A OUTPUT -p udp -j USER_CHAIN",
		"-A PREROUTING -p icmp -j ACCEPT",
	} {
		if err := ft.exec(cmd); err != nil {
			t.Fatal(err)
		}
	}
	return ft
}

// replaySteps runs a plan's steps one by one, the way sdk/iptables does.
func replaySteps(t *testing.T, ft *fakeTable, p Plan) error {
	t.Helper()
	for _, s := range p.Steps {
		if err := ft.exec(s.String()); err != nil {
			return err
		}
	}
	return nil
}

func TestApplyMatchesSequentialSteps(t *testing.T) {
	// The transaction must leave the table exactly as Consul's command
	// sequence (-N, -A, -I at the head) does on a fresh table.
	for _, c := range goldenCases() {
		t.Run(c.name, func(t *testing.T) {
			plans := mustPlans(t, c.cfg, c.families...)
			for _, p := range plans {
				seq := withForeign(t)
				if err := replaySteps(t, seq, p); err != nil {
					t.Fatalf("sequential replay: %v", err)
				}
				tx := withForeign(t)
				res, err := Apply(context.Background(), []Plan{p}, map[Family]Backend{p.Family: tx})
				if err != nil {
					t.Fatalf("apply: %v", err)
				}
				if !res[0].Changed {
					t.Fatal("fresh table reported unchanged")
				}
				if tx.dump() != seq.dump() {
					t.Fatalf("transaction state differs from sequential state\n--- tx\n%s\n--- seq\n%s", tx.dump(), seq.dump())
				}
				// A second sdk-style run fails on the first -N, which is
				// the Consul bug ferry fixes; ferry's second run is a no-op.
				if err := replaySteps(t, seq.clone(), p); err == nil || !strings.Contains(err.Error(), "already exists") {
					t.Fatalf("fake lets -N run twice: %v", err)
				}
				writes := tx.writes
				res, err = Apply(context.Background(), []Plan{p}, map[Family]Backend{p.Family: tx})
				if err != nil || res[0].Changed || tx.writes != writes {
					t.Fatalf("second apply: changed=%v writes %d->%d err=%v", res[0].Changed, writes, tx.writes, err)
				}
			}
		})
	}
}

func TestApplyReplacesDifferentConfig(t *testing.T) {
	a := mustPlans(t, baseConfig())
	cb := baseConfig()
	cb.ProxyInboundPort.Value = "21001"
	cb.ConsulDNSPort.Value = ""
	cb.ConsulDNSIP = Item{Value: "198.18.0.53", Source: "-consul-dns-ip"}
	cb.ExcludeUIDs = nil
	b := mustPlans(t, cb)

	ft := withForeign(t)
	if _, err := Apply(context.Background(), a, map[Family]Backend{IPv4: ft}); err != nil {
		t.Fatal(err)
	}
	res, err := Apply(context.Background(), b, map[Family]Backend{IPv4: ft})
	if err != nil || !res[0].Changed {
		t.Fatalf("replace: %v %v", res, err)
	}
	direct := withForeign(t)
	if _, err := Apply(context.Background(), b, map[Family]Backend{IPv4: direct}); err != nil {
		t.Fatal(err)
	}
	if ft.dump() != direct.dump() {
		t.Fatalf("A then B differs from B alone\n--- A,B\n%s\n--- B\n%s", ft.dump(), direct.dump())
	}
}

func TestApplyRepairsPartialConsulState(t *testing.T) {
	// Consul stops at the first failing command: chains exist, some rules
	// are missing. ferry must converge to the full plan.
	p := mustPlans(t, baseConfig())[0]
	ft := withForeign(t)
	for _, s := range p.Steps[:9] {
		if err := ft.exec(s.String()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Apply(context.Background(), []Plan{p}, map[Family]Backend{IPv4: ft}); err != nil {
		t.Fatal(err)
	}
	want := withForeign(t)
	if err := replaySteps(t, want, p); err != nil {
		t.Fatal(err)
	}
	if ft.dump() != want.dump() {
		t.Fatalf("got\n%s\nwant\n%s", ft.dump(), want.dump())
	}
}

func TestApplyDuplicateJumpIsRepaired(t *testing.T) {
	p := mustPlans(t, baseConfig())[0]
	ft := newFakeTable()
	if err := replaySteps(t, ft, p); err != nil {
		t.Fatal(err)
	}
	want := ft.dump()
	if err := ft.exec("-A OUTPUT -p tcp -j " + ChainOutput); err != nil {
		t.Fatal(err)
	}
	res, err := Apply(context.Background(), []Plan{p}, map[Family]Backend{IPv4: ft})
	if err != nil || !res[0].Changed {
		t.Fatalf("%v %v", res, err)
	}
	if ft.dump() != want {
		t.Fatalf("got\n%s\nwant\n%s", ft.dump(), want)
	}
}

func TestApplyRejectedChangesNothing(t *testing.T) {
	plans := mustPlans(t, baseConfig(), IPv4, IPv6)
	v4, v6 := withForeign(t), withForeign(t)
	before4, before6 := v4.dump(), v6.dump()
	v6.failCommit = func() error { return errors.New("injected commit failure") }
	_, err := Apply(context.Background(), plans, map[Family]Backend{IPv4: v4, IPv6: v6})
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("want injected failure, got %v", err)
	}
	if v4.writes != 2 {
		t.Fatalf("IPv4 should be applied then reverted, writes=%d", v4.writes)
	}
	if v4.dump() != before4 || v6.dump() != before6 {
		t.Fatalf("tables changed after failed apply\n%s\n---\n%s", v4.dump(), v6.dump())
	}

	// Revert also restores a previous ferry rule set exactly.
	v4, v6 = withForeign(t), withForeign(t)
	old := mustPlans(t, Config{ProxyUserID: Item{Value: "1"}, ProxyInboundPort: Item{Value: "1"}}, IPv4, IPv6)
	if _, err := Apply(context.Background(), old, map[Family]Backend{IPv4: v4, IPv6: v6}); err != nil {
		t.Fatal(err)
	}
	before4, before6 = v4.dump(), v6.dump()
	v6.failCommit = func() error { return errors.New("injected commit failure") }
	if _, err := Apply(context.Background(), plans, map[Family]Backend{IPv4: v4, IPv6: v6}); err == nil {
		t.Fatal("want error")
	}
	if v4.dump() != before4 || v6.dump() != before6 {
		t.Fatalf("previous rules not restored\n%s\nwant\n%s", v4.dump(), before4)
	}
}

func TestApplyTestRejectionWritesNothing(t *testing.T) {
	plans := mustPlans(t, baseConfig(), IPv4, IPv6)
	v4 := withForeign(t)
	bad := &rejecting{fakeTable: withForeign(t)}
	if _, err := Apply(context.Background(), plans, map[Family]Backend{IPv4: v4, IPv6: bad}); err == nil {
		t.Fatal("want error")
	}
	if v4.writes != 0 || bad.writes != 0 {
		t.Fatalf("writes: v4=%d v6=%d", v4.writes, bad.writes)
	}
}

type rejecting struct{ *fakeTable }

func (r *rejecting) Restore(ctx context.Context, data string, testOnly bool) error {
	return errors.New("iptables-restore: line 3 failed")
}

func TestCleanupRemovesExactlyOwned(t *testing.T) {
	p := mustPlans(t, baseConfig())[0]
	ft := withForeign(t)
	before := ft.dump()
	if _, err := Apply(context.Background(), []Plan{p}, map[Family]Backend{IPv4: ft}); err != nil {
		t.Fatal(err)
	}
	// A foreign rule that jumps into an owned chain blocks its deletion, so
	// cleanup must take it out; a foreign rule merely mentioning the name
	// in a comment must stay.
	for _, cmd := range []string{
		"-A USER_CHAIN -p tcp -j " + ChainOutput,
		`-A USER_CHAIN -m comment --comment "not -j CONSUL_PROXY_OUTPUT" -j RETURN`,
	} {
		if err := ft.exec(cmd); err != nil {
			t.Fatal(err)
		}
	}
	res, err := Cleanup(context.Background(), map[Family]Backend{IPv4: ft})
	if err != nil || !res[0].Changed {
		t.Fatalf("%v %v", res, err)
	}
	want := before + "\n" + `-A USER_CHAIN -m comment --comment "not -j CONSUL_PROXY_OUTPUT" -j RETURN`
	// dump lists rules grouped by chain; rebuild the expectation the same way.
	exp := withForeign(t)
	if err := exp.exec(`-A USER_CHAIN -m comment --comment "not -j CONSUL_PROXY_OUTPUT" -j RETURN`); err != nil {
		t.Fatal(err)
	}
	if ft.dump() != exp.dump() {
		t.Fatalf("after cleanup\n%s\nwant\n%s\n(raw %q)", ft.dump(), exp.dump(), want)
	}
	writes := ft.writes
	res, err = Cleanup(context.Background(), map[Family]Backend{IPv4: ft})
	if err != nil || res[0].Changed || ft.writes != writes {
		t.Fatalf("second cleanup: %v %v writes %d->%d", res, err, writes, ft.writes)
	}
}

func TestCleanupPartialChains(t *testing.T) {
	ft := newFakeTable()
	for _, cmd := range []string{"-N " + ChainOutputRedirect, "-N " + ChainOutput, "-A " + ChainOutput + " -j " + ChainOutputRedirect} {
		if err := ft.exec(cmd); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Cleanup(context.Background(), map[Family]Backend{IPv4: ft}); err != nil {
		t.Fatal(err)
	}
	if ft.dump() != newFakeTable().dump() {
		t.Fatalf("left over:\n%s", ft.dump())
	}
}

func TestTarget(t *testing.T) {
	for spec, want := range map[string]string{
		"-p tcp -j CONSUL_PROXY_OUTPUT":                           "CONSUL_PROXY_OUTPUT",
		"-p tcp -g CONSUL_PROXY_OUTPUT":                           "CONSUL_PROXY_OUTPUT",
		`-m comment --comment "-j CONSUL_DNS_REDIRECT" -j RETURN`: "RETURN",
		`-m comment --comment "a \" -j X" -j Y`:                   "Y",
		"-p tcp":                                                  "",
		"-j DNAT --to-destination 127.0.0.1:8600":                 "DNAT",
	} {
		if got := Target(spec); got != want {
			t.Errorf("Target(%q) = %q, want %q", spec, got, want)
		}
	}
}

func TestParseStateErrors(t *testing.T) {
	for _, lines := range [][]string{
		{"-A OUTPUT -j X"},
		{"-Z OUTPUT"},
		{"-N"},
	} {
		if _, err := ParseState(lines); err == nil {
			t.Errorf("ParseState(%q): want error", lines)
		}
	}
}

func TestApplySettlesAfterConcurrentWriter(t *testing.T) {
	// Two runs read the same empty table; the other one commits first.
	// Our transaction then adds a second set of jumps, which settle finds
	// and repairs.
	p := mustPlans(t, baseConfig())[0]
	ft := newFakeTable()
	want := newFakeTable()
	if err := replaySteps(t, want, p); err != nil {
		t.Fatal(err)
	}
	ft.beforeCommit = func(ft *fakeTable) {
		if err := replaySteps(t, ft, p); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Apply(context.Background(), []Plan{p}, map[Family]Backend{IPv4: ft}); err != nil {
		t.Fatal(err)
	}
	if ft.dump() != want.dump() {
		t.Fatalf("not settled:\n%s\nwant\n%s", ft.dump(), want.dump())
	}
}
