package proxy

import (
	"testing"

	"github.com/ferrymesh/ferry/internal/umlinit"
)

// Under User-Mode Linux (test/uml) this test binary is the kernel's init
// (internal/umlinit), so the kernel TLS data path between two sidecars
// (ktls_test.go) runs on a kernel with the tls module.
func TestMain(m *testing.M) { umlinit.Main(m) }
