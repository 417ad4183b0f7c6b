package uml

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/umlinit"
	"github.com/ferrymesh/ferry/test/testbed"
)

// marker is what a test binary prints, as init, when every test passed
// (internal/umlinit), followed by the nonce it got on the kernel command
// line. UML exits 0 whatever happens inside, so this line is the only
// result that counts.
const marker = umlinit.Marker

// kernelTests must each have passed inside UML (none may skip): a test
// renamed or deleted fails here instead of silently dropping coverage.
var kernelTests = []string{
	"TestCheckAndProbe",
	"TestDecide",
	"TestKernelInterop",
	"TestKernelSequenceNumbers",
	"TestKernelTicketSequenceAgainstCryptoTLS",
	"TestKernelRecordsOpenInUserSpace",
	"TestKernelHalfClose",
	"TestKernelReset",
	"TestKernelControlRecordsMidStream",
	"TestKernelHandoffRefused",
	"TestKernelSmallSendBufferSlowReader",
	"TestKernelTwoSidecarSplicePath",
	"TestKernelWriteBuffers",
}

// proxyTests are the proxy package's kernel TLS data path tests: two
// sidecars in process, sessions in the kernel and spliced.
var proxyTests = []string{
	"TestKTLSTwoSidecars",
	"TestKTLSHalfCloseInOrder",
	"TestKTLSResetCrosses",
	"TestKTLSFINWithoutCloseNotifyIsAnAbort",
	"TestKTLSDrainDeadlineResets",
	"TestKTLSRevocation",
	"TestKTLSRequiredRefusesUserSpace",
	"TestKTLSServerTicketsResumeUserSpaceClients",
	"TestKTLSTunnels",
	"TestKTLSTunnelsOneEndOff",
	"TestKTLSTunnelGoAwayReplays",
	"TestKTLSTunnelRevocation",
	"TestKTLSTunnelDrainDeadlineResets",
	"TestKTLSTunnelsRequired",
}

// TestKTLSUnderUML builds the ktls package's tests as a static binary and
// boots it as init of a UML kernel (6.1, tls.ko and its crypto loaded by
// init itself), where kernel TLS is required and nothing skips.
func TestKTLSUnderUML(t *testing.T) {
	runUnderUML(t, "./ktls", "", kernelTests)
}

// TestProxyKTLSUnderUML does the same with the proxy package's kernel TLS
// tests: two ferry sidecars carrying an app's stream over a kernel TLS
// session, 64 MiB each way, half-close, resets, drain, -ktls=off on one
// end, -ktls=required, and the TLS mode metric.
func TestProxyKTLSUnderUML(t *testing.T) {
	out := runUnderUML(t, "./proxy", "TestKTLS", proxyTests)
	// The metric, on both sidecars, said ktls for the agreed session and
	// userspace where one end had -ktls=off.
	for _, line := range []string{
		`=== RUN +TestKTLSTwoSidecars/both_ends\r?\n\s+ktls_test.go:\d+: sessions counted as ktls \(inbound 1, outbound 1\)`,
		`=== RUN +TestKTLSTwoSidecars/client_ktls_off\r?\n\s+ktls_test.go:\d+: sessions counted as userspace \(inbound 1, outbound 1\)`,
		// The default configuration (tunnels on): one kernel tunnel
		// session carried the first three connections.
		`ktls_tunnel_test.go:\d+: 3 tunnels over one session, counted ktls on both sidecars`,
		`goaway_test.go:\d+: replayed after GOAWAY; sessions counted ktls on both sidecars`,
		`ktls_tunnel_test.go:\d+: required with tunnels: tunnels over kernel sessions`,
	} {
		if !regexp.MustCompile(line).Match(out) {
			t.Errorf("no line %q inside UML", line)
		}
	}
}

// runUnderUML builds pkg's tests as a static binary, boots it as init of
// a UML kernel with only the tests matching run (all when empty), and
// requires the success marker and each of mustPass passed, none skipped.
// It returns the console output.
func runUnderUML(t *testing.T, pkg, run string, mustPass []string) []byte {
	testbed.Program(t, "linux.uml") // fails early, saying how to install it
	moddir := umlModules(t)
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, filepath.Base(pkg)+".test")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	build, err := testbed.CommandContext(ctx, "go", "test", "-c", "-o", bin, pkg)
	if err != nil {
		t.Fatal(err)
	}
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // init runs with no loader
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the %s test binary: %v\n%s", pkg, err, out)
	}

	nb := make([]byte, 8)
	rand.Read(nb)
	nonce := hex.EncodeToString(nb)
	logPath := filepath.Join(dir, "console.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := []string{"mem=512M", "uml_dir=" + dir,
		"root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
		"init=" + bin,
		// KEY=VALUE words reach init's environment.
		"MODDIR=" + moddir, "FERRY_KTLS_UML=" + nonce,
		"con0=fd:0,fd:1", "con=null"}
	if run != "" {
		args = append(args, "FERRY_KTLS_RUN="+run)
	}
	cmd, err := testbed.CommandContext(ctx, "linux.uml", args...)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// UML backs its memory with a file in TMPDIR; /dev/shm keeps it in RAM.
	cmd.Env = append(os.Environ(), "TMPDIR="+shmDir(dir))
	start := time.Now()
	runErr := cmd.Run()
	out, _ := os.ReadFile(logPath)
	console := out
	if i := bytes.Index(out, []byte("as init process")); i >= 0 {
		console = out[i:]
	}
	t.Logf("UML ran %s (exit: %v)", time.Since(start).Round(time.Millisecond), runErr)

	if !regexp.MustCompile(`(?m)^` + marker + ` ` + nonce + `\r?$`).Match(out) {
		t.Fatalf("no success marker from inside UML; console from init on:\n%s", console)
	}
	// Only tests for a kernel without kTLS (TestHandoffFallsBackWithoutKernelTLS)
	// may skip; these must have run and passed.
	for _, name := range mustPass {
		if !regexp.MustCompile(`(?m)^--- PASS: ` + name + ` `).Match(out) {
			t.Errorf("%s did not pass inside UML", name)
		}
		if regexp.MustCompile(`(?m)^\s*--- SKIP: ` + name + `[ /]`).Match(out) {
			t.Errorf("%s (or a subtest) skipped inside UML", name)
		}
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("console from init on:\n%s", console)
	}
	return out
}

// umlModules finds the UML kernel's module tree (it has the tls module).
func umlModules(t *testing.T) string {
	t.Helper()
	hits, _ := filepath.Glob("/usr/lib/uml/modules/*/kernel/net/tls/tls.ko*")
	if len(hits) == 0 {
		t.Fatal("tls.ko not found under /usr/lib/uml/modules: install package user-mode-linux (make deps)")
	}
	return strings.TrimSuffix(filepath.Dir(hits[0]), "/net/tls")
}

func shmDir(fallback string) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		if f, err := os.CreateTemp("/dev/shm", "uml-probe"); err == nil {
			f.Close()
			os.Remove(f.Name())
			return "/dev/shm"
		}
	}
	return fallback
}
