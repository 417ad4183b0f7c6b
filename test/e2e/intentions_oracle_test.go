package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/ferrymesh/ferry/proxy/intentions"
	"github.com/ferrymesh/ferry/test/testbed"
)

// These tests check proxy/intentions against a real agent: the agent's
// /v1/agent/connect/authorize is the oracle for L4 decisions.

const (
	ixnAllow = api.IntentionActionAllow
	ixnDeny  = api.IntentionActionDeny
)

// ixnSet writes a service-intentions entry for dest.
func ixnSet(t testing.TB, c *api.Client, dest string, sources ...*api.SourceIntention) {
	t.Helper()
	e := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: dest, Sources: sources}
	if ok, _, err := c.ConfigEntries().Set(e, nil); err != nil || !ok {
		t.Fatalf("set service-intentions %s: ok=%v err=%v", dest, ok, err)
	}
}

func ixnSrc(name string, action api.IntentionAction) *api.SourceIntention {
	return &api.SourceIntention{Name: name, Action: action}
}

func ixnL7Src(name string) *api.SourceIntention {
	return &api.SourceIntention{Name: name, Permissions: []*api.IntentionPermission{
		{Action: ixnAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/pay"}},
	}}
}

func ixnLogger(t testing.TB, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Debug, Output: ixnLogWriter{t}})
}

type ixnLogWriter struct{ t testing.TB }

func (w ixnLogWriter) Write(p []byte) (int, error) { w.t.Logf("%s", p); return len(p), nil }

// ixnWriteOracleFixture writes several destinations with exact and "*"
// sources, allow and deny, a wildcard destination and an L7 intention.
func ixnWriteOracleFixture(t testing.TB, c *api.Client) {
	t.Helper()
	// L7 Permissions need an http destination.
	sd := &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "billing", Protocol: "http"}
	if ok, _, err := c.ConfigEntries().Set(sd, nil); err != nil || !ok {
		t.Fatalf("set service-defaults billing: ok=%v err=%v", ok, err)
	}
	ixnSet(t, c, "db", ixnSrc("web", ixnAllow), ixnSrc("api", ixnDeny), ixnSrc("*", ixnDeny))
	ixnSet(t, c, "cache", ixnSrc("web", ixnDeny), ixnSrc("*", ixnAllow))
	ixnSet(t, c, "billing", ixnL7Src("web"), ixnSrc("admin", ixnAllow))
	ixnSet(t, c, "*", ixnSrc("ops", ixnAllow), ixnSrc("batch", ixnDeny), ixnSrc("web", ixnDeny))
}

type ixnOracleSource struct {
	src intentions.Source
	uri string // path after the trust domain
}

func ixnOracleSources() []ixnOracleSource {
	var out []ixnOracleSource
	for _, n := range []string{"web", "api", "admin", "ops", "batch", "stranger"} {
		out = append(out, ixnOracleSource{intentions.Source{Name: n, Namespace: "default", Partition: "default"}, "/ns/default/dc/dc1/svc/" + n})
	}
	return append(out,
		// Another namespace: only "*/*" could match it; in CE the exact and
		// "default/*" sources must not.
		ixnOracleSource{intentions.Source{Name: "web", Namespace: "other"}, "/ns/other/dc/dc1/svc/web"},
		// Another datacenter: dc is not part of the match.
		ixnOracleSource{intentions.Source{Name: "web", Namespace: "default"}, "/ns/default/dc/dc9/svc/web"},
		// Another partition: refused before intentions.
		ixnOracleSource{intentions.Source{Name: "web", Namespace: "default", Partition: "team"}, "/ap/team/ns/default/dc/dc1/svc/web"},
	)
}

// TestIntentionsOracle compares the local evaluator (fed from the real
// IntentionMatch) with the agent's authorize endpoint for every destination
// and source of a fixture, decision and reason.
func TestIntentionsOracle(t *testing.T) {
	tb := testbed.New(t)
	c := tb.Consul.Client
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	ixnWriteOracleFixture(t, c)

	// Fixed expectations guard against the evaluator and the oracle agreeing
	// on something wrong (e.g. both allowing everything).
	fixed := map[string]bool{
		"db/web": true, "db/api": false, "db/stranger": false, "db/ops": false,
		"cache/web": false, "cache/api": true,
		"billing/web": false, "billing/admin": true, "billing/ops": true, "billing/batch": false, "billing/stranger": true,
		"search/ops": true, "search/batch": false, "search/web": false, "search/stranger": true,
	}
	var allows, denies, l7, defaults, compared int
	for _, dest := range []string{"db", "cache", "billing", "search"} {
		snap, err := intentions.ConsulFetcher(c, dest, time.Second, "")(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if !snap.DefaultAllow {
			t.Fatalf("default policy deny with ACLs off")
		}
		// Consul 1.14 has no default_intention_policy: agent/self answers
		// without it and the ACL default policy header decides.
		if snap.DefaultSource != intentions.DefaultFromACL || snap.DefaultNote != "" {
			t.Fatalf("default from %q (%s), want %q", snap.DefaultSource, snap.DefaultNote, intentions.DefaultFromACL)
		}
		ev := intentions.NewEvaluator(snap.Intentions, snap.DefaultAllow)
		for _, s := range ixnOracleSources() {
			uri := "spiffe://" + roots.TrustDomain + s.uri
			res, err := c.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: dest, ClientCertURI: uri})
			if err != nil {
				t.Fatalf("authorize %s -> %s: %v", uri, dest, err)
			}
			got := ev.Decide(s.src)
			compared++
			if got.Allow != res.Authorized || got.Reason != res.Reason {
				t.Errorf("%s -> %s:\n ferry  allow=%v %q\n agent  allow=%v %q", uri, dest, got.Allow, got.Reason, res.Authorized, res.Reason)
			}
			if want, ok := fixed[dest+"/"+s.src.Name]; ok && s.src.Namespace == "default" && s.src.Partition == "default" && got.Allow != want {
				t.Errorf("%s -> %s: allow=%v, fixture says %v (%s)", s.src.Name, dest, got.Allow, want, got.Reason)
			}
			switch {
			case strings.HasPrefix(got.Reason, "Matched L7"):
				l7++
			case got.Reason == intentions.ReasonDefault:
				defaults++
			}
			if got.Allow {
				allows++
			} else {
				denies++
			}
			t.Logf("%-8s %-45s allow=%-5v %s", dest, s.uri, got.Allow, got.Reason)
		}
	}
	if allows == 0 || denies == 0 || l7 == 0 || defaults == 0 {
		t.Fatalf("fixture too weak: %d allows, %d denies, %d L7, %d default", allows, denies, l7, defaults)
	}
	t.Logf("%d decisions compared with the agent: %d allow, %d deny (%d by L7 intention, %d by default)", compared, allows, denies, l7, defaults)
}

// TestIntentionsWatcherAgent runs the Watcher against the agent: changes
// apply (and cut a live connection) within 2 s, an agent outage keeps the
// cached decisions, and the watcher recovers when the agent returns.
func TestIntentionsWatcherAgent(t *testing.T) {
	tb := testbed.New(t)
	c := tb.Consul.Client
	ixnSet(t, c, "db", ixnSrc("web", ixnAllow), ixnSrc("*", ixnDeny))

	w, err := intentions.Watch(context.Background(), intentions.Config{
		Destination: "db",
		Fetch:       intentions.ConsulFetcher(c, "db", 0, ""),
		Logger:      ixnLogger(t, "intentions"),
		MinBackoff:  100 * time.Millisecond,
		MaxBackoff:  time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	select {
	case <-w.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("watcher not ready")
	}
	web, api_ := intentions.Source{Name: "web"}, intentions.Source{Name: "api"}
	if !w.Decide(web).Allow || w.Decide(api_).Allow {
		t.Fatalf("initial: web %+v api %+v", w.Decide(web), w.Decide(api_))
	}

	// A live connection from web, held by the "inbound path".
	client, server := ixnTCPPair(t)
	d, done := w.Admit(web, func() { server.Close() })
	t.Cleanup(done)
	if !d.Allow {
		t.Fatalf("admit web: %+v", d)
	}

	// allow -> deny: new decisions and the live connection, within 2 s.
	ixnSet(t, c, "db", ixnSrc("web", ixnDeny), ixnSrc("*", ixnDeny))
	changed := time.Now()
	cut := make(chan time.Duration, 1)
	go func() {
		client.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := client.Read(make([]byte, 1))
		if err == io.EOF {
			cut <- time.Since(changed)
		} else {
			cut <- -1
		}
	}()
	took := ixnWaitDecision(t, w, web, false, changed)
	t.Logf("allow->deny: new connections denied after %v", took)
	select {
	case d := <-cut:
		if d < 0 || d > 2*time.Second {
			t.Fatalf("live connection not cut within 2s (%v)", d)
		}
		t.Logf("allow->deny: live connection cut after %v", d)
	case <-time.After(5 * time.Second):
		t.Fatal("live connection not cut")
	}

	// deny -> allow within 2 s.
	ixnSet(t, c, "db", ixnSrc("web", ixnAllow), ixnSrc("*", ixnDeny))
	took = ixnWaitDecision(t, w, web, true, time.Now())
	t.Logf("deny->allow: applied after %v", took)

	// A hung agent (SIGSTOP): the blocking query just waits; decisions keep
	// serving, and once it resumes a change still lands within 2 s.
	tb.Consul.Pause()
	for range 6 {
		if !w.Decide(web).Allow || w.Decide(api_).Allow {
			tb.Consul.Resume()
			t.Fatal("decisions changed while the agent is paused")
		}
		time.Sleep(50 * time.Millisecond)
	}
	tb.Consul.Resume()
	ixnSet(t, c, "db", ixnSrc("web", ixnAllow), ixnSrc("newbie", ixnAllow), ixnSrc("*", ixnDeny))
	took = ixnWaitDecision(t, w, intentions.Source{Name: "newbie"}, true, time.Now())
	t.Logf("after pause/resume: change applied after %v", took)

	// Agent stopped: cached decisions keep serving, also for a source never
	// seen before (it is decided from the full list for db).
	tb.Consul.Stop()
	waitUntil := time.Now().Add(10 * time.Second)
	for !w.Stats().Failing {
		if time.Now().After(waitUntil) {
			t.Fatal("watcher did not notice the agent going away")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for range 10 {
		if !w.Decide(web).Allow || w.Decide(api_).Allow || w.Decide(intentions.Source{Name: "never-seen"}).Allow {
			t.Fatal("decisions changed while the agent is down")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !w.Loaded() {
		t.Fatal("not loaded during outage")
	}

	// Agent back. A dev agent restarts empty (its state is in memory), so
	// write a list that differs from both the old one and the empty default.
	if err := tb.Consul.Start(); err != nil {
		t.Fatal(err)
	}
	ixnSet(t, c, "db", ixnSrc("web", ixnDeny), ixnSrc("*", ixnAllow))
	took = ixnWaitDecision(t, w, web, false, time.Now())
	if !w.Decide(api_).Allow || w.Stats().Failing {
		t.Fatalf("after recovery: api %+v stats %+v", w.Decide(api_), w.Stats())
	}
	t.Logf("recovered after restart: new list applied %v after the write; stats %+v", took, w.Stats())
}

// ixnWaitDecision waits until w decides src as want, failing after 2 s
// (the bound) counted from since.
func ixnWaitDecision(t *testing.T, w *intentions.Watcher, src intentions.Source, want bool, since time.Time) time.Duration {
	t.Helper()
	for {
		if w.Decide(src).Allow == want {
			return time.Since(since)
		}
		if time.Since(since) > 2*time.Second {
			t.Fatalf("decision for %v still %+v 2s after the change", src, w.Decide(src))
		}
		time.Sleep(time.Millisecond)
	}
}

func ixnTCPPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		client.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// BenchmarkIntentionsDecision compares the per-connection cost of ferry's
// local decision with one authorize call to the agent (what Consul's built-in
// proxy does per handshake).
func BenchmarkIntentionsDecision(b *testing.B) {
	tb := testbed.New(b)
	c := tb.Consul.Client
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		b.Fatal(err)
	}
	ixnWriteOracleFixture(b, c)
	w, err := intentions.Watch(context.Background(), intentions.Config{
		Destination: "db", Fetch: intentions.ConsulFetcher(c, "db", 0, ""),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	select {
	case <-w.Ready():
	case <-time.After(10 * time.Second):
		b.Fatal(errors.New("watcher not ready"))
	}
	b.Run("local", func(b *testing.B) {
		src := intentions.Source{Name: "web", Namespace: "default", Partition: "default"}
		b.ReportAllocs()
		for b.Loop() {
			if !w.Decide(src).Allow {
				b.Fatal("denied")
			}
		}
	})
	b.Run("agent-authorize", func(b *testing.B) {
		p := &api.AgentAuthorizeParams{Target: "db", ClientCertURI: "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/web"}
		b.ReportAllocs()
		for b.Loop() {
			res, err := c.Agent().ConnectAuthorize(p)
			if err != nil || !res.Authorized {
				b.Fatalf("authorize: %+v %v", res, err)
			}
		}
	})
}
