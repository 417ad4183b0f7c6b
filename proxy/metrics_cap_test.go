package proxy

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/proxy/intentions"
)

// The denied metric's label sets are bounded (audit F16): past the cap,
// new sources are counted under "other", and the deciding intention is
// named by its rule, not its ID.
func TestDeniedMetricBounded(t *testing.T) {
	m := NewDeniedMetric()
	for i := range deniedSeriesMax + 500 {
		m.With(fmt.Sprintf("svc-%d", i), "backend", "default").Inc()
	}
	var b bytes.Buffer
	m.WritePrometheus(&b)
	if n := strings.Count(b.String(), "ferry_intentions_denied_total{"); n > deniedSeriesMax+1 {
		t.Fatalf("%d series, want at most %d", n, deniedSeriesMax+1)
	}
	if !strings.Contains(b.String(), `ferry_intentions_denied_total{source="other",destination="other",intention="other"} 500`) {
		t.Fatalf("overflow series missing or wrong:\n%s", b.String()[len(b.String())-300:])
	}
	for _, tc := range []struct{ desc, want string }{
		{"", "default"},
		{"default/web => default/backend (ID: 1234, Precedence: 9, Action: DENY)", "default/web => default/backend (Action: DENY)"},
		{"default/* => default/backend (Precedence: 8, Permissions: 2)", "default/* => default/backend (Permissions: 2)"},
	} {
		if got := intentionLabel(intentions.Decision{Intention: tc.desc}); got != tc.want {
			t.Errorf("label for %q: %q, want %q", tc.desc, got, tc.want)
		}
	}
}
