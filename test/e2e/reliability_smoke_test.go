package e2e

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestReliabilityQuick runs the reliability suite in quick mode (the CI
// suite, a few minutes): it fails on any lost or corrupted byte, silently
// truncated stream, leaked fd or crashed sidecar the harness detects, and
// checks the report and its charts were written and the testbed removed.
func TestReliabilityQuick(t *testing.T) {
	testbed.RequireRoot(t)
	if testing.Short() {
		t.Skip("the quick reliability suite takes about three minutes")
	}
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "reliability")
	build := testbed.MustCommand(t, "go", "build", "-o", bin, "./test/reliability")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build reliability: %v\n%s", err, out)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd, err := testbed.CommandContext(ctx, bin, "-quick", "-out", out)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Dir = root
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	log, runErr := cmd.CombinedOutput()
	reports, _ := filepath.Glob(filepath.Join(out, "*-quick.md"))
	var md string
	if len(reports) == 1 {
		b, _ := os.ReadFile(reports[0])
		md = string(b)
	}
	if runErr != nil {
		t.Fatalf("reliability -quick: %v\n%s\nreport:\n%s", runErr, log, md)
	}
	if len(reports) != 1 {
		t.Fatalf("want one quick report in %s, got %v\n%s", out, reports, log)
	}
	for _, name := range []string{"concurrency", "sustained load with churn", "resource exhaustion", "hostile input", "process faults"} {
		if !strings.Contains(md, "## "+name+" — PASS") {
			t.Errorf("report has no passing section %q", name)
		}
	}
	for _, c := range []string{"rss", "fds"} {
		png := strings.TrimSuffix(reports[0], ".md") + "-" + c + ".png"
		if st, err := os.Stat(png); err != nil || st.Size() == 0 {
			t.Errorf("chart %s missing or empty: %v", filepath.Base(png), err)
		}
	}
	if m := regexp.MustCompile(`testbed ([0-9a-f]+):`).FindStringSubmatch(string(log)); m == nil {
		t.Errorf("harness did not name its testbed")
	} else {
		for _, argv := range [][]string{{"ip", "netns", "list"}, {"ip", "-o", "link", "show"}} {
			o, _ := testbed.MustCommand(t, argv[0], argv[1:]...).Output()
			if strings.Contains(string(o), m[1]) {
				t.Errorf("testbed %s left behind (%s):\n%s", m[1], strings.Join(argv, " "), o)
			}
		}
	}
	if t.Failed() {
		t.Logf("report:\n%s\nharness output:\n%s", md, log)
	}
}
