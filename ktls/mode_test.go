package ktls

import (
	"context"
	"testing"
)

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
		ok   bool
	}{{"auto", Auto, true}, {"off", Off, true}, {"required", Required, true}, {"", Auto, false}, {"on", Auto, false}} {
		m, err := ParseMode(tc.in)
		if (err == nil) != tc.ok || (tc.ok && (m != tc.want || m.String() != tc.in)) {
			t.Errorf("ParseMode(%q) = %v, %v", tc.in, m, err)
		}
	}
}

// Decide follows the kernel: here (no kTLS) auto falls back and required
// refuses; under UML both use it. Off never does.
func TestDecide(t *testing.T) {
	ctx := context.Background()
	if use, reason, err := Decide(ctx, Off); use || reason == nil || err != nil {
		t.Errorf("off: %v %v %v", use, reason, err)
	}
	have := Probe(ctx) == nil
	use, reason, err := Decide(ctx, Auto)
	if use != have || err != nil || (reason == nil) == !have {
		t.Errorf("auto (kernel TLS %v): %v %v %v", have, use, reason, err)
	}
	use, _, err = Decide(ctx, Required)
	if use != have || (err == nil) != have {
		t.Errorf("required (kernel TLS %v): %v %v", have, use, err)
	}
}
