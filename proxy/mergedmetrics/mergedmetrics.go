// Package mergedmetrics serves the merged Prometheus endpoint consul-k8s
// scrapes (consul-dataplane's -telemetry-prom-*): the sidecar's own
// metrics and the app's (-telemetry-prom-service-metrics-url) on the
// registration's envoy_prometheus_bind_addr, as one valid text-format
// page. A source that fails makes the whole scrape a 500, as
// consul-dataplane's, so that a gap is visible rather than silent.
//
// Both sources are parsed and the output written with
// github.com/prometheus/common/expfmt, Prometheus's own parser and
// encoder: a concatenation of two pages is invalid text format as soon as
// a family appears in both or a page lacks its final newline, and a
// malformed app page must be refused, not passed on.
//
// It imports nothing of ours.
package mergedmetrics

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Config configures Handler.
type Config struct {
	// Own writes the sidecar's metrics in text format.
	Own func(w io.Writer)
	// ServiceURL is the app's metrics endpoint; "" for none.
	ServiceURL string
	// Client fetches ServiceURL; default a client with a 5 s timeout.
	Client *http.Client
}

// maxBody bounds the app's page.
const maxBody = 32 << 20

// Handler serves the merged page.
func Handler(cfg Config) http.Handler {
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: 5 * time.Second}
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		page, err := merge(r.Context(), cfg)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
		w.Write(page)
	})
}

func merge(ctx context.Context, cfg Config) ([]byte, error) {
	var own bytes.Buffer
	if cfg.Own != nil {
		cfg.Own(&own)
	}
	fams, err := parse(&own)
	if err != nil {
		return nil, fmt.Errorf("sidecar metrics: %w", err)
	}
	if cfg.ServiceURL != "" {
		app, err := fetch(ctx, cfg.Client, cfg.ServiceURL)
		if err != nil {
			return nil, fmt.Errorf("service metrics: %w", err)
		}
		for name, mf := range app {
			cur, ok := fams[name]
			switch {
			case !ok:
				fams[name] = mf
			case cur.GetType() == mf.GetType():
				cur.Metric = append(cur.Metric, mf.Metric...)
			default:
				return nil, fmt.Errorf("metric %s is a %s in the sidecar's metrics and a %s in the service's", name, cur.GetType(), mf.GetType())
			}
		}
	}
	names := make([]string, 0, len(fams))
	for n := range fams {
		names = append(names, n)
	}
	slices.Sort(names)
	var out bytes.Buffer
	for _, n := range names {
		if _, err := expfmt.MetricFamilyToText(&out, fams[n]); err != nil {
			return nil, fmt.Errorf("encoding %s: %w", n, err)
		}
	}
	return out.Bytes(), nil
}

func fetch(ctx context.Context, c *http.Client, url string) (map[string]*dto.MetricFamily, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	if len(body) > 0 && body[len(body)-1] != '\n' {
		body = append(body, '\n') // common in hand-written pages; the parser insists
	}
	return parse(bytes.NewReader(body))
}

func parse(r io.Reader) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, err
	}
	return fams, nil
}
