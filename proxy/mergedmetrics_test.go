package proxy

import (
	"net/http/httptest"
	"testing"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/ferrymesh/ferry/proxy/mergedmetrics"
)

// ferry's own page must parse with Prometheus's parser, or the merged
// endpoint consul-k8s scrapes would answer 500 forever.
func TestOwnMetricsParseForMerging(t *testing.T) {
	testkit.CheckLeaks(t)
	p := startProxy(t, Config{}, testkit.EchoServer(t))
	in, _ := p.Addrs()
	if _, err := exchange(t, in.String(), "x"); err != nil {
		t.Fatal(err)
	}
	p.Metrics().Set.Register(NewDeniedMetric())
	h := mergedmetrics.Handler(mergedmetrics.Config{Own: p.Metrics().Set.WritePrometheus})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("merged page of ferry's own metrics: %d %s", rec.Code, rec.Body.String())
	}
}
