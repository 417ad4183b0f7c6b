package ktls

import (
	"testing"

	"github.com/ferrymesh/ferry/internal/umlinit"
)

// Under User-Mode Linux (test/uml) this test binary is the kernel's init
// (internal/umlinit): it loads the tls module, runs the tests with kernel
// TLS required (nothing skips) and prints umlinit.Marker only if they all
// passed.
func TestMain(m *testing.M) { umlinit.Main(m) }
