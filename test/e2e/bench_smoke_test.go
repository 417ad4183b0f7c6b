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

// TestBenchSmoke runs the benchmark harness in a reduced quick mode and
// checks that it writes a report with a row (or a "not available" reason)
// for every path, and its charts. It asserts nothing about speed.
func TestBenchSmoke(t *testing.T) {
	testbed.RequireRoot(t)
	if testing.Short() {
		t.Skip("bench smoke test takes about a minute")
	}
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "bench")
	build := testbed.MustCommand(t, "go", "build", "-o", bin, "./test/bench")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build bench: %v\n%s", err, out)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd, err := testbed.CommandContext(ctx, bin, "-quick", "-reps", "1", "-idle", "200", "-out", out)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Dir = root
	// On timeout let the harness tear its testbed down (it handles SIGTERM).
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	log, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bench -quick: %v\n%s", err, log)
	}
	reports, _ := filepath.Glob(filepath.Join(out, "*-quick.md"))
	if len(reports) != 1 {
		t.Fatalf("want one quick report in %s, got %v\n%s", out, reports, log)
	}
	b, err := os.ReadFile(reports[0])
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, name := range []string{"direct (no proxy)", "ferry passthrough (1 hop)", "ferry mTLS pair", "Consul built-in pair", "HAProxy TLS pair"} {
		if !strings.Contains(md, "| "+name+" |") && !strings.Contains(md, "- **"+name+"**: ") {
			t.Errorf("report has neither a row nor a not-available reason for %q", name)
		}
	}
	// The baseline and the incumbent must always be measured.
	for _, name := range []string{"direct (no proxy)", "Consul built-in pair"} {
		if !strings.Contains(md, "| "+name+" |") {
			t.Errorf("report has no row for %q", name)
		}
	}
	// Each path's TLS mode, read from the ferry sidecars' own counter for
	// the mTLS pair (user space unless this kernel has kernel TLS), and
	// whether the machine could show kernel TLS at all.
	for _, re := range []string{
		`\| Consul built-in pair \| userspace \(Go crypto/tls\) \|`,
		`\| ferry mTLS pair \| (userspace|ktls) \(\d+ sessions, both sidecars\) \|`,
		`(?m)^Kernel TLS: (unavailable|available)`,
	} {
		if !regexp.MustCompile(re).MatchString(md) {
			t.Errorf("report lacks %s", re)
		}
	}
	for _, c := range []string{"throughput", "cpu", "connrate", "latency"} {
		png := strings.TrimSuffix(reports[0], ".md") + "-" + c + ".png"
		if st, err := os.Stat(png); err != nil || st.Size() == 0 {
			t.Errorf("chart %s missing or empty: %v", filepath.Base(png), err)
		}
	}
	// Everything the harness built is gone.
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
