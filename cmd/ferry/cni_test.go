package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCNIForTest(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(append([]string{"cni"}, args...), &out, &errb)
	code = exitCode(err, &errb)
	return out.String(), errb.String(), code
}

// A plugin failure is a CNI error result on stdout and exit status 1,
// with nothing on stderr from ferry's own error printing.
func TestCNIPluginErrorResult(t *testing.T) {
	t.Setenv("CNI_COMMAND", "ADD")
	for _, k := range []string{"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"} {
		t.Setenv(k, "")
	}
	out, errs, code := runCNIForTest(t)
	if code != 1 {
		t.Fatalf("exit %d", code)
	}
	var e struct {
		Code uint   `json:"code"`
		Msg  string `json:"msg"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil || e.Code != 4 || !strings.Contains(e.Msg, "CNI_NETNS") {
		t.Fatalf("stdout %q (%v)", out, err)
	}
	if strings.Contains(errs, "ferry:") {
		t.Fatalf("stderr: %s", errs)
	}
}

func TestCNIUsage(t *testing.T) {
	if out, _, code := runCNIForTest(t, "-h"); code != 0 || !strings.Contains(out, "ferry-cni install") {
		t.Fatalf("-h: %d %s", code, out)
	}
	if _, _, code := runCNIForTest(t, "bogus"); code != 2 {
		t.Fatalf("bogus argument: exit %d", code)
	}
	if _, _, code := runCNIForTest(t, "install", "extra"); code != 2 {
		t.Fatalf("extra argument: exit %d", code)
	}
}

// install and uninstall through the CLI, without Kubernetes (-api-server ""):
// the CNI dirs end as they started.
func TestCNIInstallCLI(t *testing.T) {
	bin, net := t.TempDir(), t.TempDir()
	conf := `{"cniVersion":"1.0.0","name":"podnet","type":"bridge"}`
	if err := os.WriteFile(filepath.Join(net, "10-podnet.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errs, code := runCNIForTest(t, "install", "-cni-bin-dir", bin, "-cni-net-dir", net, "-api-server", "")
	if code != 0 || !strings.Contains(out, "installed in") {
		t.Fatalf("install: %d %s %s", code, out, errs)
	}
	if out, _, code = runCNIForTest(t, "install", "-cni-bin-dir", bin, "-cni-net-dir", net, "-api-server", ""); code != 0 || !strings.Contains(out, "nothing changed") {
		t.Fatalf("second install: %d %s", code, out)
	}
	if _, err := os.Stat(filepath.Join(bin, "ferry-cni")); err != nil {
		t.Fatal(err)
	}
	if out, errs, code = runCNIForTest(t, "uninstall", "-cni-bin-dir", bin, "-cni-net-dir", net); code != 0 {
		t.Fatalf("uninstall: %d %s %s", code, out, errs)
	}
	ents, _ := os.ReadDir(net)
	b, _ := os.ReadFile(filepath.Join(net, "10-podnet.conf"))
	if len(ents) != 1 || string(b) != conf {
		t.Fatalf("after uninstall: %v %q", ents, b)
	}
	if ents, _ := os.ReadDir(bin); len(ents) != 0 {
		t.Fatalf("bin dir after uninstall: %v", ents)
	}
}
