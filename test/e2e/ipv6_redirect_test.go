package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/test/testbed"
)

// TestRedirectIPv6HalfFails: in a dual-stack pod, the IPv6 transaction
// fails in the kernel after the IPv4 one was committed (ip6tables-restore
// passes the dry run, then refuses the commit). Both tables must be left
// as they were: empty on a first run, the previous rules on a re-run with
// new input. The IPv4 half is reverted, never left alone in force.
func TestRedirectIPv6HalfFails(t *testing.T) {
	testbed.RequireRoot(t)
	ferry := testbed.FerryBinary(t)
	tb := testbed.New(t)
	p := tb.AddPod(t, "v6half")
	p.AddIPv6(t)

	bin := t.TempDir()
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, prog := range []string{"iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-save"} {
		if err := os.Symlink(testbed.Program(t, prog), filepath.Join(bin, prog)); err != nil {
			t.Fatal(err)
		}
	}
	// The dry run (--test) is real; a commit fails.
	wrapper := "#!" + testbed.Program(t, "bash") + "\n" +
		`for a in "$@"; do if [ "$a" = --test ]; then exec ` + testbed.Program(t, "ip6tables-restore") + ` "$@"; fi; done` + "\n" +
		`echo "ip6tables-restore: injected commit failure" >&2; exit 1` + "\n"
	if err := os.WriteFile(filepath.Join(bin, "ip6tables-restore"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	failing := testbed.Proc{Env: []string{"PATH=" + bin}}

	argsA := []string{ferry, "redirect", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-consul-dns-port", "8600"}
	argsB := append(append([]string(nil), argsA...), "-exclude-outbound-cidr", "198.18.0.0/15,2001:db8::/32", "-exclude-uid", "5996")

	check := func(what, want4, want6 string) {
		t.Helper()
		if got4, got6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save"); got4 != want4 || got6 != want6 {
			t.Fatalf("%s: the tables changed\n--- IPv4\n%s\n--- want\n%s\n--- IPv6\n%s\n--- want\n%s", what, got4, want4, got6, want6)
		}
	}

	empty4, empty6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save")
	out, err := p.Exec(t, failing, argsA...)
	if err == nil || !strings.Contains(out, "injected commit failure") {
		t.Fatalf("first run with a failing IPv6 commit: %v\n%s", err, out)
	}
	check("first run", empty4, empty6)

	out = p.ExecOK(t, testbed.Proc{}, argsA...)
	if !strings.Contains(out, "IPv4 traffic redirection rules installed") || !strings.Contains(out, "IPv6 traffic redirection rules installed") {
		t.Fatalf("run A: %s", out)
	}
	a4, a6 := natTable(t, p, "iptables-save"), natTable(t, p, "ip6tables-save")
	out, err = p.Exec(t, failing, argsB...)
	if err == nil || !strings.Contains(out, "injected commit failure") {
		t.Fatalf("run B with a failing IPv6 commit: %v\n%s", err, out)
	}
	check("re-run with new input", a4, a6)

	// Cleanup and idempotence hold for both families.
	out = p.ExecOK(t, testbed.Proc{}, argsA...)
	if strings.Count(out, "nothing changed") != 2 {
		t.Fatalf("run A again: %s", out)
	}
	p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup")
	check("cleanup", empty4, empty6)
	if out := p.ExecOK(t, testbed.Proc{}, ferry, "redirect", "-cleanup"); strings.Count(out, "no traffic redirection rules to remove") != 2 {
		t.Fatalf("second cleanup: %s", out)
	}
}
