package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestCNIInstallDaemon runs the DaemonSet's command, `ferry cni install
// -daemon`, against temp CNI dirs: it repairs the config when the network
// plugin rewrites it without ferry-cni, and SIGTERM uninstalls, leaving the
// dirs as they were.
func TestCNIInstallDaemon(t *testing.T) {
	ferry := testbed.FerryBinary(t)
	bin, net := t.TempDir(), t.TempDir()
	conf := filepath.Join(net, "10-podnet.conf")
	orig := `{"cniVersion":"1.0.0","name":"podnet","type":"bridge","ipam":{"type":"host-local","subnet":"198.18.9.0/24"}}` + "\n"
	if err := os.WriteFile(conf, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	binBefore := dirBytes(t, bin)
	cmd := exec.Command(ferry, "cni", "install", "-daemon", "-interval", "100ms", "-cni-bin-dir", bin, "-cni-net-dir", net, "-api-server", "")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	list := filepath.Join(net, "10-podnet.conflist")
	has := func() bool {
		b, err := os.ReadFile(list)
		return err == nil && strings.Contains(string(b), `"ferry-cni"`)
	}
	meshPoll(t, "install", 10*time.Second, has)
	// The network plugin rewrites its config (as a conflist, without us).
	rewritten := `{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","ipam":{"type":"host-local","subnet":"198.18.9.0/24"}}]}` + "\n"
	if err := os.WriteFile(list, []byte(rewritten), 0o644); err != nil {
		t.Fatal(err)
	}
	meshPoll(t, "repair", 10*time.Second, has)
	if !strings.Contains(out.String(), "repaired") {
		t.Fatalf("no repair logged:\n%s", out.String())
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Fatalf("daemon exit: %v\n%s", err, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("daemon did not exit on SIGTERM:\n%s", out.String())
	}
	// The repaired file was the network plugin's rewrite: uninstall takes
	// only ferry-cni out of it (the .conf it replaced is not ours to
	// restore), and leaves nothing else of ours behind.
	if b, _ := os.ReadFile(list); strings.Contains(string(b), "ferry-cni") || !strings.Contains(string(b), `"bridge"`) {
		t.Fatalf("after uninstall:\n%s", b)
	}
	if ents, _ := os.ReadDir(net); len(ents) != 1 || ents[0].Name() != "10-podnet.conflist" {
		t.Fatalf("net dir after uninstall: %v", ents)
	}
	if got := dirBytes(t, bin); got != binBefore {
		t.Fatalf("bin dir after uninstall:\n%s", got)
	}
}

// dirBytes lists dir's files with their modes and contents.
func dirBytes(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		fi, _ := e.Info()
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		b.WriteString(e.Name() + " " + fi.Mode().String() + "\n" + string(data) + "\n")
	}
	return b.String()
}
