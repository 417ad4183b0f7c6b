package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestMergedMetricsTLSAndReadiness: the two listeners a consul-k8s pod's
// kubelet and Prometheus reach on the pod IP, against the real agent.
// The registration's envoy_prometheus_bind_addr (0.0.0.0:20200, as
// consul-k8s's endpoints controller sets it) serves ferry's metrics merged
// with the app's, over HTTPS only when -telemetry-prom-cert-file is given
// (consul-k8s's prometheus-cert-file annotations): a scraper without a
// client certificate is served, one whose certificate the CA bundle does
// not vouch for is refused, plain HTTP gets no page. -ready-addr
// (consul-dataplane's -envoy-ready-bind-address/-port, which consul-k8s
// passes with use-proxy-health-check) answers the kubelet's GET /ready
// and nothing else. The clients are the test process on the node.
func TestMergedMetricsTLSAndReadiness(t *testing.T) {
	testbed.RequireRoot(t)
	tb := testbed.New(t)
	pod := tb.AddPod(t, "web")

	// The app's own metrics, which consul-k8s points
	// -telemetry-prom-service-metrics-url at.
	meshServeHTTP(t, pod, "127.0.0.1:9102", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "# TYPE app_requests_total counter\napp_requests_total{code=\"200\"} 7\n")
	})

	// The certificate ferry serves (for the pod IP) and the CA bundle a
	// scraper's certificate is checked against, readable by UID 5995.
	dir, err := os.MkdirTemp("", "ferry-metrics-tls-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	caPEM, certFile, keyFile := servingCerts(t, dir, pod.IP.AsSlice())
	caFile := filepath.Join(dir, "scrapers-ca.pem")
	writeFile(t, caFile, string(caPEM))
	for _, f := range []string{certFile, keyFile, caFile} {
		if err := os.Chown(f, meshProxyUID, meshProxyUID); err != nil {
			t.Fatal(err)
		}
	}
	// A certificate from another CA, presented by a scraper.
	otherDir := t.TempDir()
	_, otherCert, otherKey := servingCerts(t, otherDir, net.IPv4(127, 0, 0, 1))
	stranger, err := tls.LoadX509KeyPair(otherCert, otherKey)
	if err != nil {
		t.Fatal(err)
	}

	r := tb.Register(t, testbed.Service{Name: "web", Pod: pod, Port: 8080,
		ProxyConfig: map[string]any{"envoy_prometheus_bind_addr": "0.0.0.0:20200"}})
	readyAddr := net.JoinHostPort(pod.IP.String(), "21000")
	meshRestart(t, t, pod, r.ProxyID,
		"-telemetry-prom-service-metrics-url=http://127.0.0.1:9102/metrics",
		"-telemetry-prom-cert-file="+certFile, "-telemetry-prom-key-file="+keyFile,
		"-telemetry-prom-ca-certs-path="+caFile, "-ready-addr="+readyAddr)

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	metricsURL := "https://" + net.JoinHostPort(pod.IP.String(), "20200") + "/metrics"
	scrape := func(cert *tls.Certificate) (int, string, error) {
		cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
		if cert != nil {
			// Presented whatever CAs ferry names (Go's client would
			// otherwise leave out a certificate of another CA).
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
		resp, err := c.Get(metricsURL)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}

	var code int
	var body string
	pollUntil(t, "the merged metrics on 20200 over HTTPS", func() bool {
		code, body, err = scrape(nil)
		return err == nil && code == 200
	})
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("merged page does not parse: %v\n%s", err, body)
	}
	if m := fams["app_requests_total"].GetMetric(); len(m) != 1 || m[0].GetCounter().GetValue() != 7 {
		t.Errorf("the app's metric is not in the merged page:\n%s", body)
	}
	if len(fams["ferry_connections_total"].GetMetric()) == 0 {
		t.Errorf("ferry's metrics are not in the merged page:\n%s", body)
	}
	if code, _, err := scrape(&stranger); err == nil {
		t.Errorf("a client certificate from another CA was served (%d)", code)
	}
	plain := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := plain.Get(strings.Replace(metricsURL, "https:", "http:", 1)); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), "app_requests_total") {
			t.Errorf("plain HTTP got the metrics page (%d)", resp.StatusCode)
		}
	}

	// The kubelet's readiness probe on the pod IP.
	get := func(path string) (int, string) {
		resp, err := plain.Get("http://" + readyAddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/ready"); code != 200 || strings.TrimSpace(body) != "ready" {
		t.Errorf("GET %s/ready: %d %q, want 200 ready", readyAddr, code, body)
	}
	for _, path := range []string{"/metrics", "/quitquitquit", "/"} {
		if code, body := get(path); code != 404 {
			t.Errorf("GET %s%s: %d %q, want 404 (the readiness port serves /ready alone)", readyAddr, path, code, body)
		}
	}
}
