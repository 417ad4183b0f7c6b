package mergedmetrics

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/testkit"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

const own = "# HELP ferry_connections_total Connections.\n# TYPE ferry_connections_total counter\nferry_connections_total{direction=\"inbound\"} 3\n"

func TestMergedScrape(t *testing.T) {
	var down atomic.Bool
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "boom", 500)
			return
		}
		// No final newline, and a family name ferry uses too.
		io.WriteString(w, "# TYPE app_requests_total counter\napp_requests_total{code=\"200\"} 7\n# TYPE ferry_connections_total counter\nferry_connections_total{direction=\"app\"} 1")
	}))
	t.Cleanup(app.Close)
	s := NewServer("/metrics", Config{Own: func(w io.Writer) { io.WriteString(w, own) }, ServiceURL: app.URL + "/metrics"}, nil, nil)
	t.Cleanup(func() { s.Close() })
	if err := s.Apply("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://%s/metrics", s.Addr())
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %d %s", resp.StatusCode, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("merged page does not parse: %v\n%s", err, body)
	}
	if n := len(fams["ferry_connections_total"].GetMetric()); n != 2 {
		t.Errorf("ferry_connections_total has %d series, want 2:\n%s", n, body)
	}
	if fams["app_requests_total"].GetMetric()[0].GetCounter().GetValue() != 7 {
		t.Errorf("app metric lost:\n%s", body)
	}
	if resp, err := http.Get(fmt.Sprintf("http://%s/other", s.Addr())); err == nil {
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Errorf("other path: %d", resp.StatusCode)
		}
	}

	down.Store(true)
	resp, err = http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 500 {
		t.Fatalf("app down: %d, want 500", resp.StatusCode)
	}
	app.Close()
	resp, err = http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 500 {
		t.Fatalf("app unreachable: %d, want 500", resp.StatusCode)
	}
	if err := s.Apply(""); err != nil || s.Addr() != nil {
		t.Fatalf("Apply(\"\"): %v %v", err, s.Addr())
	}
}

func TestMergedScrapeBadAppPage(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "this is { not prometheus\n")
	}))
	t.Cleanup(app.Close)
	h := Handler(Config{Own: func(w io.Writer) { io.WriteString(w, own) }, ServiceURL: app.URL})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 500 {
		t.Fatalf("malformed app page: %d", rec.Code)
	}
	// No service URL: ferry's own metrics alone.
	h = Handler(Config{Own: func(w io.Writer) { io.WriteString(w, own) }})
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `ferry_connections_total{direction="inbound"} 3`) {
		t.Fatalf("own only: %d %s", rec.Code, rec.Body.String())
	}
}

// TestMergedScrapeTLS: with a TLS config the listener serves HTTPS only;
// a plain HTTP scrape gets no page.
func TestMergedScrapeTLS(t *testing.T) {
	srvTLS, cliTLS := testkit.SelfSignedTLS(t)
	s := NewServer("/metrics", Config{Own: func(w io.Writer) { io.WriteString(w, own) }}, srvTLS, nil)
	t.Cleanup(func() { s.Close() })
	if err := s.Apply("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cliTLS}
	t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get(fmt.Sprintf("https://%s/metrics", s.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "ferry_connections_total") {
		t.Fatalf("HTTPS scrape: %d %s", resp.StatusCode, body)
	}
	plain := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := plain.Get(fmt.Sprintf("http://%s/metrics", s.Addr())); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), "ferry_connections_total") {
			t.Fatalf("plain HTTP scrape served the page: %d", resp.StatusCode)
		}
	}
}
