package e2e

import (
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestStaticBinary builds ferry with the release flags (Makefile, Dockerfile)
// and runs it in an empty chroot: the scratch image has nothing else either.
func TestStaticBinary(t *testing.T) {
	testbed.RequireRoot(t)
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "ferry")
	build := testbed.MustCommand(t, "go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=static-test", "-o", bin, "./cmd/ferry")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("binary has a dynamic loader (PT_INTERP): not static")
		}
	}

	out, err := testbed.MustCommand(t, "chroot", dir, "/ferry", "version").CombinedOutput()
	if err != nil {
		t.Fatalf("ferry version in an empty chroot: %v\n%s", err, out)
	}
	if !strings.HasPrefix(string(out), "ferry static-test ") {
		t.Fatalf("ferry version = %q", out)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("chroot was not empty: %v", entries)
	}
}
