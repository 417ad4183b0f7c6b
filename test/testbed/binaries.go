package testbed

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireRoot skips t unless the test runs as root: pods need network
// namespaces, veths and iptables. CI runs as root, so there they always run.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testbed: needs root (network namespaces, veth, iptables); run `make test` as root")
	}
}

// RepoRoot is the directory of ferry's go.mod, found by walking up from the
// working directory (go test runs each package in its own directory).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(data, []byte("module github.com/ferrymesh/ferry\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("testbed: ferry's go.mod not found above the working directory")
		}
		dir = parent
	}
}

// binaries caches built paths for this test process; builds themselves are
// shared across processes through files under .cache/bin and a file lock.
type binaries struct {
	mu    sync.Mutex
	paths map[string]string
}

// built is the process-wide cache. Package-level state is deliberate here:
// several tests in one process must share one build, and tests have no other
// place to keep it.
var built = &binaries{paths: map[string]string{}}

// ConsulBinary returns the path of the consul v1.14.11 binary built from the
// tools module under test/. The first build takes minutes on a fresh machine;
// later ones reuse the binary as long as the tools module's go.sum is unchanged.
func ConsulBinary(t testing.TB) string {
	t.Helper()
	p, err := Consul()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Consul is ConsulBinary for callers without a testing.TB (the demo, bench).
func Consul() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	sum, err := os.ReadFile(filepath.Join(root, "test", "tools", "go.sum"))
	if err != nil {
		return "", fmt.Errorf("testbed: read tools go.sum: %w", err)
	}
	h := sha256.Sum256(sum)
	stamp := hex.EncodeToString(h[:8])
	return built.get("consul", func() (string, error) {
		out := filepath.Join(root, ".cache", "bin", "consul")
		return out, buildLocked(root, out, stamp, []string{"go", "build", "-C", filepath.Join(root, "test", "tools"), "-o", out, "github.com/hashicorp/consul"})
	})
}

// ConnectNativeBinary returns test/tools/connectnative, a connect-native
// app built from Consul's own connect package (the tools module), for
// interop tests.
func ConnectNativeBinary(t testing.TB) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for _, f := range []string{"go.sum", "connectnative/main.go"} {
		b, err := os.ReadFile(filepath.Join(root, "test", "tools", f))
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	stamp := hex.EncodeToString(h.Sum(nil)[:8])
	p, err := built.get("connectnative", func() (string, error) {
		out := filepath.Join(root, ".cache", "bin", "connectnative")
		return out, buildLocked(root, out, stamp, []string{"go", "build", "-C", filepath.Join(root, "test", "tools"), "-o", out, "./connectnative"})
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// FerryBinary returns a ferry binary built from ./cmd/ferry as a static
// binary with the release flags, so tests run what ships.
func FerryBinary(t testing.TB) string {
	t.Helper()
	p, err := Ferry()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Ferry is FerryBinary for callers without a testing.TB.
func Ferry() (string, error) { return buildTool("ferry", "./cmd/ferry") }

// EchoBinary returns the test echo app (test/echo).
func EchoBinary(t testing.TB) string {
	t.Helper()
	p, err := Echo()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Echo is EchoBinary for callers without a testing.TB.
func Echo() (string, error) { return buildTool("echo", "./test/echo") }

func buildTool(name, pkg string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return built.get(name, func() (string, error) {
		// Per-process output: a parallel test process rebuilding the same
		// path must not replace a binary that this one is about to exec.
		dir := filepath.Join(root, ".cache", "bin")
		removeOrphans(dir, name)
		out := filepath.Join(dir, fmt.Sprintf("%s-%d", name, os.Getpid()))
		cmd, err := Command("go", "build", "-trimpath", "-o", out, pkg)
		if err != nil {
			return "", err
		}
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("testbed: build %s: %w\n%s", pkg, err, b)
		}
		return out, nil
	})
}

func (b *binaries) get(name string, build func() (string, error)) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p, ok := b.paths[name]; ok {
		return p, nil
	}
	p, err := build()
	if err != nil {
		return "", err
	}
	b.paths[name] = p
	return p, nil
}

// buildLocked runs argv to produce out unless out already exists with the
// same stamp; a file lock keeps parallel test processes from building twice.
func buildLocked(root, out, stamp string, argv []string) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("testbed: lock %s: %w", out, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if old, err := os.ReadFile(out + ".stamp"); err == nil && strings.TrimSpace(string(old)) == stamp {
		if _, err := os.Stat(out); err == nil {
			return nil
		}
	}
	cmd, err := Command(argv[0], argv[1:]...)
	if err != nil {
		return err
	}
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("testbed: %s: %w\n%s", strings.Join(argv, " "), err, b)
	}
	return os.WriteFile(out+".stamp", []byte(stamp+"\n"), 0o644)
}

// removeOrphans deletes name-<pid> binaries whose process has exited.
func removeOrphans(dir, name string) {
	matches, _ := filepath.Glob(filepath.Join(dir, name+"-*"))
	for _, m := range matches {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(m), name+"-"))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if unix.Kill(pid, 0) == unix.ESRCH {
			os.Remove(m)
		}
	}
}
