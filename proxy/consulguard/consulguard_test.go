package consulguard

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// hostile serves the behaviours of a broken agent by path.
func hostile(t *testing.T) *httptest.Server {
	t.Helper()
	chunk := []byte("[" + strings.Repeat(`{"ID":"x","Service":"y"},`, 4000))
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "7")
		switch r.URL.Path {
		case "/v1/agent/services": // a good answer
			w.Write([]byte(`{"web":{"ID":"web","Service":"web"}}`))
		case "/v1/huge/chunked", "/v1/huge/length", "/v1/internal/ui/nodes":
			n := 100 << 20
			if r.URL.Path == "/v1/huge/length" {
				w.Header().Set("Content-Length", strconv.Itoa(n))
			}
			for sent := 0; sent < n; sent += len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		case "/v1/huge/error":
			w.WriteHeader(http.StatusInternalServerError)
			for sent := 0; sent < 100<<20; sent += len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		case "/v1/slow":
			w.Write([]byte("{"))
			w.(http.Flusher).Flush()
			for {
				select {
				case <-r.Context().Done():
					return
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
					w.Write([]byte(" "))
					w.(http.Flusher).Flush()
				}
			}
		case "/v1/hang":
			select {
			case <-r.Context().Done():
			case <-stop:
			}
		}
	}))
	t.Cleanup(func() { close(stop); srv.Close() })
	return srv
}

var errStatus500 = errors.New("status 500")

func client(t *testing.T, srv *httptest.Server, cfg Config) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: srv.Listener.Addr().String(),
		HttpClient: &http.Client{Transport: New(http.DefaultTransport.(*http.Transport).Clone(), cfg)}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGuard(t *testing.T) {
	srv := hostile(t)
	// Only the trickled body may take long; the others get time to be
	// read under the race detector on a busy machine.
	patient := client(t, srv, Config{MaxBody: 1 << 20, LargeBody: 2 << 20, BodyTimeout: 30 * time.Second, HeaderTimeout: 300 * time.Millisecond})
	impatient := client(t, srv, Config{MaxBody: 1 << 20, LargeBody: 2 << 20, BodyTimeout: 300 * time.Millisecond, HeaderTimeout: 300 * time.Millisecond})
	for _, tc := range []struct {
		name, path string
		wait       time.Duration
		want       error
	}{
		{"good answer", "/v1/agent/services", 0, nil},
		{"huge chunked body", "/v1/huge/chunked", 0, ErrBodyTooLarge},
		{"huge body with its length", "/v1/huge/length", 0, ErrBodyTooLarge},
		{"huge error body", "/v1/huge/error", 0, errStatus500},
		{"huge node dump (the larger limit)", "/v1/internal/ui/nodes", 0, ErrBodyTooLarge},
		{"trickled body", "/v1/slow", 0, ErrTimeout},
		{"blocking query that never returns", "/v1/hang", 100 * time.Millisecond, ErrTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			var out map[string]any
			start := time.Now()
			c := patient
			if tc.path == "/v1/slow" {
				c = impatient
			}
			_, err := c.Raw().Query(tc.path, &out, &api.QueryOptions{WaitIndex: 1, WaitTime: tc.wait})
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("good answer: %v", err)
				}
				return
			}
			switch {
			case tc.want == errStatus500:
				// consul/api puts the body in its error, which gets logged.
				if err == nil || !strings.Contains(err.Error(), "500") || len(err.Error()) > 2*maxErrorBody {
					t.Fatalf("err = %.300v (%d bytes), want a 500 with at most %d bytes of its body", err, len(fmt.Sprint(err)), maxErrorBody)
				}
			case !errors.Is(err, tc.want):
				t.Fatalf("err = %.300v, want %v", err, tc.want)
			}
			if took > 20*time.Second {
				t.Errorf("took %v", took)
			}
			// 100 MiB offered, 1 MiB allowed: the decoder must not have
			// taken much more than the limit.
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 32<<20 {
				t.Errorf("allocated %d MiB for a 1 MiB limit", grew>>20)
			}
		})
	}
}

// A body of exactly the limit is accepted; one byte more is not.
func TestGuardLimitExact(t *testing.T) {
	body := `{"a":"` + strings.Repeat("x", 1000) + `"}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	n := int64(len(body))
	for _, tc := range []struct {
		path       string
		max, large int64
		ok         bool
	}{
		{"/v1/x", n, 0, true},
		{"/v1/x", n - 1, 0, false},
		{"/v1/internal/ui/nodes", n - 1, n, true}, // the node dump has the larger limit
		{"/v1/internal/ui/nodes", n - 1, n - 1, false},
	} {
		c := client(t, srv, Config{MaxBody: tc.max, LargeBody: tc.large})
		var out map[string]any
		_, err := c.Raw().Query(tc.path, &out, nil)
		if (err == nil) != tc.ok {
			t.Errorf("%s, limits %d/%d, %d bytes: err %v", tc.path, tc.max, tc.large, len(body), err)
		}
	}
}
