package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/proxy"
	"github.com/ferrymesh/ferry/proxy/catalog"
	"github.com/hashicorp/go-hclog"
	mdns "github.com/miekg/dns"
)

// TestDefaultRecursors: in a redirected pod resolv.conf names 127.0.0.1
// (DNATed to ferry) and kube-dns; only kube-dns may be a recursor, whatever
// loopback or wildcard address ferry's DNS listens on.
func TestDefaultRecursors(t *testing.T) {
	dir := t.TempDir()
	pod := filepath.Join(dir, "pod")
	only := filepath.Join(dir, "only")
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(pod, "search default.svc.cluster.local\nnameserver 127.0.0.1\nnameserver 198.18.0.10\noptions ndots:5\n")
	write(only, "nameserver 127.0.0.1\n")
	for _, tc := range []struct {
		path, self, want string
		warn             bool
	}{
		{pod, "127.0.0.1:8600", "198.18.0.10:53", false},
		{pod, "127.0.0.2:8600", "198.18.0.10:53", false},
		{pod, "0.0.0.0:8600", "198.18.0.10:53", false},
		{only, "127.0.0.1:8600", "", true},
		{filepath.Join(dir, "missing"), "127.0.0.1:8600", "", true},
	} {
		var logs strings.Builder
		log := hclog.New(&hclog.LoggerOptions{Output: &logs})
		got := strings.Join(defaultRecursors(tc.path, tc.self, log), " ")
		if got != tc.want || strings.Contains(logs.String(), "[WARN]") != tc.warn {
			t.Errorf("%s, self %s: got %q (log %q), want %q (warning %v)", filepath.Base(tc.path), tc.self, got, logs.String(), tc.want, tc.warn)
		}
	}
}

// TestStartDNSMetrics: the server startDNS starts answers and its counters
// are in the proxy's metric set (/metrics).
func TestStartDNSMetrics(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	view := catalog.Start(ctx, idleSource{}, catalog.Options{})
	t.Cleanup(func() { cancel(); view.Close() })
	set := &proxy.MetricSet{}
	cfg := runConfig{DNSAddr: "127.0.0.1:0", ClusterDomain: "cluster.local"}
	cfg.DNSRecursors = repeatedFlag{"127.0.0.1:1"} // nobody there: refused at once
	srv, err := startDNS(cfg, view, set, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// The view has no mesh service, so the name goes to the recursor,
	// which is not there.
	c := &mdns.Client{Timeout: 5 * time.Second}
	r, _, err := c.Exchange(new(mdns.Msg).SetQuestion("nosuch.default.svc.cluster.local.", mdns.TypeA), srv.Addr())
	if err != nil || r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("want SERVFAIL, got %v, %v", r, err)
	}
	var b strings.Builder
	set.WritePrometheus(&b)
	if !strings.Contains(b.String(), "ferry_dns_queries_total 1\n") || !strings.Contains(b.String(), "ferry_dns_servfail_total 1\n") {
		t.Fatalf("no DNS metrics in the set:\n%s", b.String())
	}
	if srv, err := startDNS(runConfig{}, view, set, hclog.NewNullLogger()); srv != nil || err != nil {
		t.Fatalf("-dns-addr \"\" started a server: %v %v", srv, err)
	}
}

// idleSource is a catalog source whose every call waits for the end: an
// agent that never answers, so the view stays empty.
type idleSource struct{}

func (idleSource) LocalDatacenter(ctx context.Context) (string, error) {
	<-ctx.Done()
	return "", ctx.Err()
}
func (idleSource) ServicesIndex(ctx context.Context, _ catalog.Query) (uint64, error) {
	<-ctx.Done()
	return 0, ctx.Err()
}
func (idleSource) Proxies(ctx context.Context) ([]catalog.ProxyRecord, uint64, error) {
	<-ctx.Done()
	return nil, 0, ctx.Err()
}
func (idleSource) DialedDirectlyDefaults(ctx context.Context, _ catalog.Query) (map[string]bool, uint64, error) {
	<-ctx.Done()
	return nil, 0, ctx.Err()
}
func (idleSource) ProxyDefaultsDialedDirectly(ctx context.Context, _ catalog.Query) (bool, uint64, error) {
	<-ctx.Done()
	return false, 0, ctx.Err()
}
func (idleSource) MeshDestinationsOnly(ctx context.Context, _ catalog.Query) (bool, uint64, error) {
	<-ctx.Done()
	return false, 0, ctx.Err()
}
func (idleSource) Connect(ctx context.Context, _ string, _ catalog.Query) ([]catalog.Instance, uint64, error) {
	<-ctx.Done()
	return nil, 0, ctx.Err()
}
