package ktls

import (
	"context"
	"errors"
	"os"
	"testing"
)

// Check and Probe agree with the kernel: on this build machine (no
// CONFIG_TLS) both refuse with ErrUnsupported; under UML, with tls.ko
// loaded, both succeed.
func TestCheckAndProbe(t *testing.T) {
	ulp, err := os.ReadFile(availableULP)
	if err != nil {
		t.Skipf("no %s: %v", availableULP, err)
	}
	cerr, perr := Check(), Probe(context.Background())
	t.Logf("tcp_available_ulp %q: Check %v, Probe %v", ulp, cerr, perr)
	if cerr != nil {
		if os.Getenv("FERRY_KTLS_REQUIRED") != "" {
			t.Fatalf("kernel TLS required: %v", cerr)
		}
		if !errors.Is(cerr, ErrUnsupported) || !errors.Is(perr, ErrUnsupported) {
			t.Fatalf("Check %v, Probe %v: want ErrUnsupported", cerr, perr)
		}
		return
	}
	if perr != nil {
		t.Fatalf("Check passes but Probe fails: %v", perr)
	}
}
