package ktls

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Under User-Mode Linux (test/uml) this test binary is the kernel's init:
// the kernel passes FERRY_KTLS_UML=<nonce> from its command line in the
// environment. Init then mounts /proc, brings lo up, loads the tls module
// and its crypto from MODDIR, runs the tests verbosely with kernel TLS
// required (nothing skips), prints the success marker with the nonce only
// if they all passed, and powers off. The host side trusts nothing but
// that marker: UML's exit status is always 0.
func TestMain(m *testing.M) {
	if nonce := os.Getenv("FERRY_KTLS_UML"); nonce != "" && os.Getpid() == 1 {
		umlInit(m, nonce)
		return
	}
	os.Exit(m.Run())
}

// UMLMarker starts the line init prints when every test passed.
const UMLMarker = "FERRY-KTLS-UML-PASS"

// umlModules are loaded in this order (each needs the ones before it).
var umlModules = []string{
	"crypto/gf128mul.ko",
	"crypto/ghash-generic.ko",
	"crypto/ctr.ko",
	"crypto/gcm.ko",
	"net/tls/tls.ko",
}

func umlInit(m *testing.M, nonce string) {
	defer func() {
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}()
	if err := umlSetup(os.Getenv("MODDIR")); err != nil {
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
	fmt.Printf("%s %s\n", UMLMarker, nonce)
}

func umlSetup(moddir string) error {
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
	for _, mod := range umlModules {
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
