// Package umlinit turns a package's test binary into the init of a
// User-Mode Linux kernel (test/uml): a kernel with the tls module, which
// this machine's kernel lacks. It is for tests only.
//
// The host boots the binary with FERRY_KTLS_UML=<nonce> and MODDIR on the
// kernel command line (they reach init's environment). Init mounts /proc
// and a /tmp, brings lo up, loads the tls module and its crypto from
// MODDIR, runs the tests verbosely with FERRY_KTLS_REQUIRED=1 (kernel TLS
// tests must not skip), prints Marker and the nonce only if they all
// passed, and powers off. UML's exit status is always 0: the host trusts
// nothing but that line.
package umlinit

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Marker starts the line init prints when every test passed.
const Marker = "FERRY-KTLS-UML-PASS"

// Main is a test package's TestMain: under UML (pid 1 with FERRY_KTLS_UML
// set) it runs the tests as init; otherwise it runs them as usual.
func Main(m *testing.M) {
	if nonce := os.Getenv("FERRY_KTLS_UML"); nonce != "" && os.Getpid() == 1 {
		runInit(m, nonce)
		return
	}
	os.Exit(m.Run())
}

// modules are loaded in this order (each needs the ones before it).
var modules = []string{
	"crypto/gf128mul.ko",
	"crypto/ghash-generic.ko",
	"crypto/ctr.ko",
	"crypto/gcm.ko",
	"net/tls/tls.ko",
}

func runInit(m *testing.M, nonce string) {
	defer func() {
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}()
	if err := setup(os.Getenv("MODDIR")); err != nil {
		fmt.Printf("uml init: %v\n", err)
		return
	}
	os.Setenv("FERRY_KTLS_REQUIRED", "1")
	_ = flag.Set("test.v", "true")
	if run := os.Getenv("FERRY_KTLS_RUN"); run != "" {
		_ = flag.Set("test.run", run)
	}
	if code := m.Run(); code != 0 {
		fmt.Printf("uml init: tests failed (exit %d)\n", code)
		return
	}
	fmt.Printf("%s %s\n", Marker, nonce)
}

func setup(moddir string) error {
	if err := unix.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	// The root is the host's, read-only: tests get their own /tmp.
	if err := unix.Mount("tmpfs", "/tmp", "tmpfs", 0, "size=64m"); err != nil {
		return fmt.Errorf("mount /tmp: %w", err)
	}
	os.Setenv("TMPDIR", "/tmp")
	if err := linkUp("lo"); err != nil {
		return err
	}
	if moddir == "" {
		return fmt.Errorf("MODDIR not set")
	}
	for _, mod := range modules {
		if err := loadModule(filepath.Join(moddir, mod)); err != nil {
			return err
		}
	}
	return nil
}

func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s flags: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	return nil
}

// loadModule loads a module file with finit_module(2): the test binary
// has no modprobe to call.
func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return fmt.Errorf("load module %s: %w", path, err)
	}
	return nil
}
